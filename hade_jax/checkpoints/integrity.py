"""Checksums of a checkpoint's contents, and the check that refuses damaged ones.

Orbax and TensorStore notice a truncated or missing file, but not overwritten bytes inside a
data file: without these checksums such a checkpoint restores "successfully" with wrong values
(tests/test_reliability.py). Nothing here reads or writes files, so it is testable alone.

`meta`, saved with every step, holds:
  format     META_FORMAT
  state      {'params/...': '0x%08x'}: a uint32 per array of the whole train state
  config     sha256 of the resolved config (JSON)
  data       sha256 of the data iterator state (JSON), when one was saved
  counters   the trainer's counters (not a checksum; restored with the step)
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

META_FORMAT = 1


class CorruptCheckpointError(ValueError):
  """A checkpoint restored, but its contents do not match the checksums saved with it."""


def make_meta(state: Any, config: dict, counters: dict | None) -> dict:
  """The `meta` item of a step holding `state` and `config` (see the module docstring)."""
  return {"format": META_FORMAT, "state": state_checksums(state),
          "config": json_digest(config), "counters": dict(counters or {})}


def verify(where: Any, meta: dict, *, state: Any = None, config: dict | None = None,
           partial: bool = False) -> None:
  """Raises CorruptCheckpointError unless `state` and `config` match `meta`'s checksums.

  Args:
    where: the step directory (named in the errors).
    meta: the step's `meta` item.
    state: the arrays read (None: not checked).
    config: the config read (None: not checked).
    partial: `state` is a part of the saved state (e.g. params without optimizer state):
      arrays saved but not read are not checked; an array read without a saved checksum is
      an error all the same.
  """
  if meta.get("format") != META_FORMAT:
    raise CorruptCheckpointError(f"{where}/meta has format {meta.get('format')!r}, "
                                 f"expected {META_FORMAT}")
  if config is not None and json_digest(config) != meta.get("config"):
    raise CorruptCheckpointError(f"{where}/config does not match the checksum saved with it")
  if state is None:
    return
  saved, found = meta.get("state") or {}, state_checksums(state)
  names = found.keys() if partial else saved.keys() | found.keys()
  bad = sorted(k for k in names if saved.get(k) != found.get(k))
  if bad:
    raise CorruptCheckpointError(
        f"{len(bad)} of {len(found)} arrays read from {where}/state do not match the checksums "
        f"saved with them: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}. The files "
        "are damaged: use another step (or copy) of this checkpoint")


def json_digest(value: Any) -> str:
  """sha256 of a JSON value (given as a value, or as JSON text or bytes)."""
  if isinstance(value, bytes | str):  # Grain's DataLoader iterators give JSON bytes
    value = json.loads(value)
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def state_checksums(state: Any) -> dict[str, str]:
  """A uint32 checksum per array of a pytree, computed where the arrays live.

  Each element's bits are mixed with its flat index and summed modulo 2**32: integer sums
  do not depend on the reduction order, so the values are the same for any mesh, sharding
  or number of processes, and a changed, swapped or moved element changes them.

  Returns:
    {'opt_state/0/mu/...': '0x%08x'}: paths by key names only, so that a restore into
    another container type (a dict for a namedtuple) names the same arrays alike.
  """
  leaves = jax.tree_util.tree_leaves_with_path(state)
  if not leaves:
    return {}
  mesh = next((x.sharding.mesh for _, x in leaves
               if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)), None)
  sums = jax.device_get(_checksum_fn(mesh)([x for _, x in leaves]))
  return {path_name(path): f"0x{int(v):08x}"
          for (path, _), v in zip(leaves, sums, strict=True)}


def path_name(path) -> str:
  """A pytree key path as 'a/b/0': key names only (see `state_checksums`)."""
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return "/".join(names)


@functools.lru_cache(maxsize=8)
def _checksum_fn(mesh):
  out = None
  if mesh is not None:  # replicated, so that every process can read the sums
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda xs: [_array_checksum(x) for x in xs], out_shardings=out)


def _array_checksum(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  width = x.dtype.itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}.get(width, jnp.uint32)
  bits_N = jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)
  h_N = bits_N ^ (jnp.arange(bits_N.size, dtype=jnp.uint32) * np.uint32(0x9E3779B9))
  # MurmurHash3's finaliser: every input bit flips about half of the output bits.
  h_N = (h_N ^ (h_N >> 16)) * np.uint32(0x85EBCA6B)
  h_N = (h_N ^ (h_N >> 13)) * np.uint32(0xC2B2AE35)
  h_N = h_N ^ (h_N >> 16)
  return jnp.sum(h_N, dtype=jnp.uint32)
