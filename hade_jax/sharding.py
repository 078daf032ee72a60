"""Sharding is data: a mesh from the config and ordered regex rules over parameter paths.

A mesh is `[('data', -1), ('fsdp', 1)]` (-1 = all remaining devices). Parameter rules are
`(regex, spec)` pairs matched in order against '/'-joined parameter paths; the first match wins.
A spec is a tuple of mesh-axis names / None per array dimension, or one of the strings
  'replicate'  every device holds the whole array;
  'fsdp'       shard the largest dimension divisible by the 'fsdp' axis size over 'fsdp'
               (replicate when none divides), as big_vision's FSDP rule.
Batches are sharded over all mesh axes along their leading dimension.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh from `[(name, size), ...]`; one size may be -1 (the rest of the devices)."""
  devices = list(jax.devices() if devices is None else devices)
  try:
    shape = mesh_shape(axes, len(devices))
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  used = math.prod(shape.values())  # an explicit smaller mesh uses the first devices
  return Mesh(np.asarray(devices[:used]).reshape(tuple(shape.values())), tuple(shape))


def mesh_shape(axes: Any, num_devices: int) -> dict[str, int]:
  """The axis sizes of the mesh `axes` on `num_devices` devices (`make_mesh` builds it).

  Raises:
    ValueError: malformed axes (names, sizes), or sizes that do not divide the devices.
  """
  if isinstance(axes, str) or not isinstance(axes, Sequence) or not axes:
    raise ValueError(f"expected a non-empty sequence of (axis name, size) pairs, got {axes!r}")
  names, sizes = [], []
  for item in axes:
    if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
      raise ValueError(f"expected (axis name, size) pairs, got {item!r}")
    name, size = item
    if not isinstance(name, str) or not name:
      raise ValueError(f"axis name {name!r} is not a non-empty string")
    is_int = isinstance(size, numbers.Integral) and not isinstance(size, bool)
    if not is_int or not (size >= 1 or size == -1):
      raise ValueError(f"axis {name!r}: size {size!r} is not a positive integer or -1 "
                       "(the remaining devices)")
    names.append(name)
    sizes.append(int(size))
  if len(set(names)) != len(names):
    raise ValueError(f"axis names {names} repeat")
  if sizes.count(-1) > 1:
    raise ValueError(f"{list(axes)}: at most one axis may have size -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"{list(axes)} does not divide the {num_devices} available devices "
                     f"(the fixed axes need a multiple of {known})")
  used = num_devices if -1 in sizes else known
  sizes = [used // known if s == -1 else s for s in sizes]
  return dict(zip(names, sizes, strict=True))


def spec_for(path: str, shape: tuple[int, ...], rules: Sequence[tuple[str, object]],
             mesh: Mesh) -> P:
  """The PartitionSpec of one parameter by the first matching rule."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if spec == "replicate" or spec is None:
        return P()
      if spec == "fsdp":
        n = mesh.shape.get("fsdp", 1)
        if n == 1:
          return P()
        dims = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in dims:
          if shape[i] % n == 0:
            axes = [None] * len(shape)
            axes[i] = "fsdp"
            return P(*axes)
        return P()
      spec = tuple(spec)
      if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} -> {spec} has {len(spec)} axes but "
                         f"parameter {path} has shape {shape}")
      return P(*spec)
  return P()


def state_shardings(state: nnx.State, rules: Sequence[tuple[str, object]], mesh: Mesh):
  """NamedShardings for every leaf of an nnx.State (or any pytree of arrays/Variables)."""
  def one(path, leaf):
    name = "/".join(_key_str(k) for k in path)
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(name, shape, rules, mesh))

  return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local batches into global arrays sharded along the batch axes.

  The rows of process i follow those of processes 0..i-1 (the mesh lists devices process by
  process), which is the order the input pipeline deals global batches in.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs that carry their target sharding: orbax restores straight onto it,
  whatever mesh or number of processes wrote the checkpoint."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def replicate(tree, mesh: Mesh):
  """Every device gets the whole of every array (a collective: all processes call it)."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def to_host(tree):
  """numpy copies of (possibly multi-process) global arrays, on every process.

  A collective when an array spans several processes: all processes call it, in the same order.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def _key_str(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)
