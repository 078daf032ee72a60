"""Optimiser: AdamW with warmup + cosine decay, per-group learning rates, freezing, clipping.

Parameter groups are ordered regex rules over '/'-joined parameter paths (first match wins),
e.g. `[('^(audio|text)_encoder/', 'backbone'), ('.*', 'heads')]`; each group has its own peak
learning rate and weight decay, and a group named in `frozen` gets no update at all (its
optimiser state is empty, so freezing a tower also saves its Adam moments).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from hade_jax import config_schema, sharding


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


def frozen_mask(params, config: config_schema.OptimConfig | Mapping[str, Any]):
  """Pytree of bools shaped like `params`: True for the parameters of a `frozen` group, which
  the optimizer never updates (the training step takes no gradient of them)."""
  config = optim_config(config)
  frozen = set(config.frozen)
  return jax.tree.map(lambda group: group in frozen, group_labels(params, config.groups))


def optim_config(section: config_schema.OptimConfig | Mapping[str, Any]
                 ) -> config_schema.OptimConfig:
  """`config.optim` (a ConfigDict, a mapping or the section itself) as its checked section."""
  if isinstance(section, config_schema.OptimConfig):
    return section
  values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
  known = {f.name for f in dataclasses.fields(config_schema.OptimConfig)}
  if unknown := sorted(values.keys() - known):
    raise ValueError(f"config.optim has unknown fields {unknown} (known: {sorted(known)})")
  for key in ("groups", "frozen"):  # JSON (a saved config) turns tuples into lists
    if key in values:
      values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in values[key])
  return config_schema.OptimConfig(**values)


def make(params, config: config_schema.OptimConfig | Mapping[str, Any], *, total_steps: int,
         warmup_steps: int) -> optax.GradientTransformation:
  """The full optimiser of `config.optim` for a parameter pytree (used only for its structure).

  `warmup_steps` is `config.warmup_epochs` in steps (the trainer knows the epoch length).
  """
  config = optim_config(config)
  labels = group_labels(params, config.groups)
  names = sorted(set(jax.tree.leaves(labels)))
  transforms = {}
  for name in names:
    if name in config.frozen:
      transforms[name] = optax.set_to_zero()
      continue
    if name not in config.lr:
      raise ValueError(f"config.optim.lr has no learning rate for group {name!r} "
                       f"(groups: {names})")
    transforms[name] = optax.adamw(
        schedule(config.lr[name], total_steps, warmup_steps, config.end_factor), b1=config.b1,
        b2=config.b2, eps=config.eps, weight_decay=float(config.weight_decay.get(name, 0.0)))
  tx = optax.multi_transform(transforms, labels)
  if config.clip_norm and config.clip_norm > 0:
    # Frozen gradients are zeroed BEFORE the global-norm clip so a frozen tower does not
    # shrink the updates of the parameters that train.
    zero_frozen = optax.multi_transform(
        {n: optax.set_to_zero() if n in config.frozen else optax.identity() for n in names},
        labels)
    tx = optax.chain(zero_frozen, optax.clip_by_global_norm(config.clip_norm), tx)
  if config.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.accum_steps)
  return tx


def learning_rates(config: config_schema.OptimConfig | Mapping[str, Any], total_steps: int,
                   warmup_steps: int, step: int) -> dict[str, float]:
  """Each group's learning rate at `step` (for logging)."""
  config = optim_config(config)
  return {f"lr/{g}": float(schedule(v, total_steps, warmup_steps, config.end_factor)(step))
          for g, v in config.lr.items()}
