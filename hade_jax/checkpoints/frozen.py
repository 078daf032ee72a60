"""Frozen parameters, stored once per workdir instead of in every step.

A frozen group (`config.optim.frozen`, e.g. the demo's pretrained text tower) never changes
during a run, so each step's `state/` holds a scalar placeholder in place of each of its
arrays, and the values are written once to `<workdir>/frozen/`:

  frozen/state      the frozen arrays (an orbax pytree, by their state names)
  frozen/meta.json  {'format': 1, 'state': their checksums (`integrity.state_checksums`)}

A step's `meta` names the frozen arrays and the digest of those checksums
(`{'names': [...], 'digest': ...}`); a read fills them back from the store of the workdir the
step belongs to and refuses a store that is missing, damaged or from another run.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from hade_jax.checkpoints import integrity

DIRNAME = "frozen"


def names(frozen_params: Any) -> frozenset[str]:
  """The state names ('params/...') of the leaves that are True in a pytree of bools shaped
  like the parameters."""
  return frozenset(f"params/{integrity.path_name(path)}"
                   for path, frozen in jax.tree_util.tree_leaves_with_path(frozen_params)
                   if frozen)


def stub(tree: Any, frozen_names: frozenset[str] | set[str]) -> Any:
  """`tree` (a state, or its ShapeDtypeStructs) with a scalar placeholder for each frozen leaf."""
  def replace(path, x):
    return _placeholder(x) if integrity.path_name(path) in frozen_names else x
  return jax.tree_util.tree_map_with_path(replace, tree)


def store_dir(step_dir: pathlib.Path) -> pathlib.Path:
  """The store of the workdir a step directory (`<workdir>/<manager>/<step>`) belongs to."""
  return pathlib.Path(step_dir).absolute().parent.parent / DIRNAME


def save_once(workdir: pathlib.Path, state: Any, frozen_names: frozenset[str]) -> dict:
  """Writes the store unless the workdir has it already; returns the step's `meta['frozen']`.

  Raises:
    RuntimeError: the workdir's store holds other values (a frozen group changed within a run).
  """
  values = _nested({n: x for n, x in _named_leaves(state) if n in frozen_names})
  checksums = integrity.state_checksums(values)
  digest = integrity.json_digest(checksums)
  target = pathlib.Path(workdir) / DIRNAME
  if (target / "meta.json").is_file():
    if integrity.json_digest(_read_meta(target)["state"]) != digest:
      raise RuntimeError(f"the frozen parameters differ from those stored in {target}; a "
                         "frozen group cannot change within a workdir (use a new --workdir)")
  else:
    _write(target, values, checksums)
  return {"names": sorted(frozen_names), "digest": digest}


def fill(state: Any, step_dir: pathlib.Path, frozen_meta: dict, target: Any,
         restore: Callable[..., Any]) -> Any:
  """`state` read from a step, with the frozen leaves read from the workdir's store (verified
  against its checksums and the step's digest).

  Args:
    target: the ShapeDtypeStructs the caller restores onto (None: numpy arrays).
    restore: the store's array reader, `restore(path, target, partial=...)`.
  """
  where = store_dir(step_dir)
  if not (where / "meta.json").is_file():
    raise integrity.CorruptCheckpointError(
        f"{step_dir} keeps its frozen parameters in {where}, which is missing: copy the whole "
        "workdir (or export the model with python -m hade_jax.export), not one step folder")
  meta = _read_meta(where)
  if integrity.json_digest(meta.get("state")) != frozen_meta.get("digest"):
    raise integrity.CorruptCheckpointError(
        f"{where} does not hold the frozen parameters {step_dir} was saved with")
  wanted = {n for n, _ in _named_leaves(state)} & set(frozen_meta["names"])
  abstract = None
  if target is not None:
    abstract = _nested({n: x for n, x in _named_leaves(target) if n in wanted})
  values = restore(where / "state", abstract, partial=True)
  integrity.verify(where, meta, state=values, partial=True)
  flat = dict(_named_leaves(values))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: flat.get(integrity.path_name(path), x), state)


# ---------------------------------------------------------------------------------------------


def _placeholder(x: Any) -> Any:
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((), x.dtype, sharding=sharding)
  if sharding is None:
    return np.zeros((), x.dtype)
  return jax.make_array_from_callback((), sharding, lambda _: np.zeros((), x.dtype))


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
  return [(integrity.path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _nested(flat: dict[str, Any]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: the store's arrays keep their state names."""
  tree: dict = {}
  for name, x in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = x
  return tree


def _read_meta(where: pathlib.Path) -> dict:
  meta = json.loads((where / "meta.json").read_text())
  if meta.get("format") != integrity.META_FORMAT:
    raise integrity.CorruptCheckpointError(f"{where}/meta.json has format "
                                           f"{meta.get('format')!r}")
  return meta


def _write(target: pathlib.Path, values: dict, checksums: dict) -> None:
  """All processes write the arrays to `<target>.tmp`; process 0 adds the checksums and renames
  it, so a kill mid-write leaves no store (the next save writes it again)."""
  tmp = target.with_name(target.name + ".tmp")
  if jax.process_index() == 0 and tmp.exists():
    shutil.rmtree(tmp)
  _barrier("hade_jax.frozen.clean")
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(tmp / "state", values)
  if jax.process_index() == 0:
    (tmp / "meta.json").write_text(json.dumps({"format": integrity.META_FORMAT,
                                               "state": checksums}))
    tmp.rename(target)
  _barrier("hade_jax.frozen.written")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
