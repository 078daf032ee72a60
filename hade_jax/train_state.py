"""The train state: one typed pytree, built in one place.

Checkpoints hold it as orbax saves any pytree: one item per field, so the arrays on disk are
`step`, `params/...`, `rest/...` and `opt_state/...` (the same names as the dicts the trainer
wrote before this class; either restores into the other).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from hade_jax import hade


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: the number of steps taken (int32 scalar; the step's rng is `fold_in(rng, step)`).
    params: the trained parameters (`nnx.Param`s of `hade.split_model`).
    rest: the other variables (batch-norm statistics), updated by the forward pass.
    opt_state: the optimizer's state for `params`.
  """

  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: optax.OptState

  @classmethod
  def create(cls, model: hade.HadeModel, tx: optax.GradientTransformation) -> TrainState:
    """The state at step 0 of `model`'s weights (shared with the model, not copied)."""
    _, params, rest = hade.split_model(model)
    return cls(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
               opt_state=tx.init(params))

  @classmethod
  def abstract(cls, create_model: Callable[[], hade.HadeModel],
               tx: optax.GradientTransformation) -> TrainState:
    """The state's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), nothing allocated."""
    return jax.eval_shape(lambda: cls.create(create_model(), tx))

  def model(self, graphdef: nnx.GraphDef) -> hade.HadeModel:
    """The model of these weights (`graphdef` from `hade.split_model`)."""
    return nnx.merge(graphdef, self.params, self.rest)
