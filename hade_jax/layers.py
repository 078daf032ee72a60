"""Small building blocks shared by the encoders and heads.

Dropout takes its randomness from an `nnx.Rngs` passed at call time (None = eval), so the
model state holds no RNG counters and a training step can derive its key as
`fold_in(rng, step)`: exact resume needs nothing but the step number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout; identity when `rngs` is None (evaluation) or `rate` is 0."""
  if rngs is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x_BxZ: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: drops whole residual branches per example (Swin / HTS-AT)."""
  if rngs is None or rate <= 0.0:
    return x_BxZ
  shape = (x_BxZ.shape[0],) + (1,) * (x_BxZ.ndim - 1)
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, shape)
  return jnp.where(keep, x_BxZ / (1.0 - rate), jnp.zeros_like(x_BxZ))


def activation(name: str):
  """Activations by their HF names. HF 'gelu' is the exact (erf) GELU."""
  table = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "tanh": jnp.tanh,
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
  }
  if name not in table:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(table)}")
  return table[name]
