"""Optimiser: AdamW with warmup + cosine decay, per-group learning rates, freezing, clipping.

Parameter groups are ordered regex rules over '/'-joined parameter paths (first match wins),
e.g. `[('^(audio|text)_encoder/', 'backbone'), ('.*', 'heads')]`; each group has its own peak
learning rate and weight decay, and a group named in `frozen` gets no update at all (its
optimiser state is empty, so freezing a tower also saves its Adam moments).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import optax

from hade_jax import sharding


def schedule(peak: float, total_steps: int, warmup_steps: int, end_factor: float = 0.0
             ) -> optax.Schedule:
  """Linear warmup from 0 to `peak`, then cosine decay to `end_factor * peak`."""
  warmup_steps = max(0, min(warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=end_factor * peak)


def group_labels(params, rules: Sequence[tuple[str, str]]):
  """Pytree of group names, one per parameter, by the first matching regex."""
  compiled = [(re.compile(p), g) for p, g in rules]

  def label(path, _):
    name = "/".join(sharding._key_str(k) for k in path)  # noqa: SLF001
    for pattern, group in compiled:
      if pattern.search(name):
        return group
    raise ValueError(f"parameter {name} matches no rule in config.optim.groups")

  return jax.tree_util.tree_map_with_path(label, params)


def make(params, *, groups: Sequence[tuple[str, str]], lr: Mapping[str, float],
         weight_decay: Mapping[str, float], frozen: Sequence[str], total_steps: int,
         warmup_steps: int, clip_norm: float, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, end_factor: float = 0.0, accum_steps: int = 1
         ) -> optax.GradientTransformation:
  """The full optimiser for a parameter pytree (used only for its structure)."""
  labels = group_labels(params, groups)
  names = sorted(set(jax.tree.leaves(labels)))
  transforms = {}
  for name in names:
    if name in frozen:
      transforms[name] = optax.set_to_zero()
      continue
    if name not in lr:
      raise ValueError(f"config.optim.lr has no learning rate for group {name!r} "
                       f"(groups: {names})")
    transforms[name] = optax.adamw(
        schedule(lr[name], total_steps, warmup_steps, end_factor), b1=b1, b2=b2, eps=eps,
        weight_decay=float(weight_decay.get(name, 0.0)))
  tx = optax.multi_transform(transforms, labels)
  if clip_norm and clip_norm > 0:
    # Frozen gradients are zeroed BEFORE the global-norm clip so a frozen tower does not
    # shrink the updates of the parameters that train.
    zero_frozen = optax.multi_transform(
        {n: optax.set_to_zero() if n in frozen else optax.identity() for n in names}, labels)
    tx = optax.chain(zero_frozen, optax.clip_by_global_norm(clip_norm), tx)
  if accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
  return tx


def learning_rates(groups_lr: Mapping[str, float], total_steps: int, warmup_steps: int,
                   step: int, end_factor: float = 0.0) -> dict[str, float]:
  """Each group's learning rate at `step` (for logging)."""
  return {f"lr/{g}": float(schedule(v, total_steps, warmup_steps, end_factor)(step))
          for g, v in groups_lr.items()}
