"""Small building blocks shared by the encoders and heads.

Dropout takes its randomness from an `nnx.Rngs` passed at call time (None = eval), so the
model state holds no RNG counters and a training step can derive its key as
`fold_in(rng, step)`: exact resume needs nothing but the step number.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Threefry-2x32 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"): 20
# rounds in 5 groups of 4, a key injection after each group; the rotations alternate per group.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA
# Elements of a mask drawn per iteration of `keep_mask`'s loop: small enough for the hash's
# intermediates to stay in cache, large enough that the loop's overhead does not show.
_MASK_CHUNK = 1 << 14


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array):
  """The Threefry-2x32 block function, its rounds written out as plain integer ops."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(_THREEFRY_PARITY))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for group in range(5):
    for rotation in _THREEFRY_ROTATIONS[group % 2]:
      x1 = x1 + x2
      x2 = x1 ^ _rotate_left(x2, rotation)
    x1 = x1 + ks[(group + 1) % 3]
    x2 = x2 + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x1, x2


def _draws_by_chunks(key: jax.Array, shape: tuple[int, ...]) -> bool:
  """Whether `keep_mask` draws this mask itself: a threefry key with JAX's partitionable
  counters (the element's flat index), a float32 uniform (under x64, `jax.random.bernoulli`
  draws float64 ones from 64 bits), and a mask large enough for the loop to pay."""
  return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
          and str(jax.random.key_impl(key)) == "threefry2x32"
          and bool(getattr(jax.config, "jax_threefry_partitionable", True))
          and jax.dtypes.canonicalize_dtype(np.float64) == np.float32
          and len(shape) >= 2 and 2 * _MASK_CHUNK <= math.prod(shape) < 2**31)


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """`jax.random.bernoulli(key, keep_prob, shape)`, bit for bit, drawn faster on a CPU.

  JAX lowers threefry on a CPU as a loop over the hash's 5 groups of rounds, each a pass over
  the whole array in memory (0.24 s a step for the 21 M draws of BENCHMARKS.md's CLAP-size
  step, against 0.037 s drawn here). Here a loop over chunks of the trailing axes (every
  leading index in each chunk) runs the 20 rounds written out on one cache-sized chunk at a
  time and stores the booleans. The loop keeps the hash out of the mask's consumers: fused
  into each of them (forward and backward), XLA took tens of minutes to compile a model. Small
  masks (stochastic depth's per-example draws) and other keys (rbg) take
  `jax.random.bernoulli` itself.
  """
  shape = tuple(int(d) for d in shape)
  if not _draws_by_chunks(key, shape):
    return jax.random.bernoulli(key, keep_prob, shape)
  k1, k2 = jax.random.key_data(key)
  lead, rest = shape[0], math.prod(shape[1:])
  width = min(rest, max(1, _MASK_CHUNK // lead))
  chunks = -(-rest // width)
  row_base = jax.lax.broadcasted_iota(jnp.uint32, (lead, width), 0) * np.uint32(rest)
  column = jax.lax.broadcasted_iota(jnp.uint32, (lead, width), 1)
  threshold = np.float32(keep_prob)

  def draw_chunk(i, keep):
    start = i * np.uint32(width)
    bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros((lead, width), jnp.uint32),
                                 row_base + start + column)
    # jax.random.uniform: 23 random mantissa bits under exponent 0 give [1, 2), minus 1.
    mantissa = ((bits1 ^ bits2) >> np.uint32(32 - 23)) | np.uint32(0x3F800000)
    uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return jax.lax.dynamic_update_slice(keep, uniform < threshold,
                                        (jnp.int32(0), start.astype(jnp.int32)))

  keep = jax.lax.fori_loop(np.uint32(0), np.uint32(chunks), draw_chunk,
                           jnp.zeros((lead, chunks * width), jnp.bool_))
  return keep[:, :rest].reshape(shape)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout; identity when `rngs` is None (evaluation) or `rate` is 0."""
  if rngs is None or rate <= 0.0:
    return x
  keep = keep_mask(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x_BxZ: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Stochastic depth: drops whole residual branches per example (Swin / HTS-AT)."""
  if rngs is None or rate <= 0.0:
    return x_BxZ
  shape = (x_BxZ.shape[0],) + (1,) * (x_BxZ.ndim - 1)
  keep = keep_mask(rngs.dropout(), 1.0 - rate, shape)
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
