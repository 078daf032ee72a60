"""Orbax checkpoints that resume exactly: train state + Grain iterator state + resolved config.

Layout of a workdir:
  checkpoints/<step>/{state, data, config, meta}   the last `keep` steps (every process writes)
  best/<step>/{state, config, meta}                the best step by the validation metric

`meta` holds checksums of the other items (a uint32 per state array, computed on device, so
they do not depend on the mesh or the number of processes; sha256 of the data iterator state
and of the config) and the trainer's counters. Orbax and TensorStore notice a truncated or
missing file, but not overwritten bytes inside a data file: without the checksums such a
checkpoint restores "successfully" with wrong values (tests/test_reliability.py).

Resume order (trainer.train_and_evaluate): an existing checkpoint in the workdir, then
`config.init.resume` (a checkpoint directory), then pretrained imports, then scratch.
A damaged newest checkpoint (unreadable, or not matching its checksums) is skipped with a
warning in favour of the newest valid one and renamed `<step>.unreadable` (orbax would
otherwise skip rewriting that step number); the run never silently starts from scratch while
checkpoints exist. Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when
complete, so a process killed mid-write leaves no partial step; leftovers are removed when the
next run opens the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

META_FORMAT = 1


class CorruptCheckpointError(ValueError):
  """A checkpoint restored, but its contents do not match the checksums saved with it."""


@dataclasses.dataclass
class Restored:
  """What `Checkpoints.restore_latest` found."""

  step: int
  state: Any
  data: Any  # the restored data iterator (None without one)
  config: dict  # the resolved config saved with the step
  counters: dict  # the trainer's counters saved with the step (see `Checkpoints.save`)


class Checkpoints:
  """The last-N manager and the best-by-metric manager of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, best_metric: str | None,
               best_mode: str = "max"):
    workdir = pathlib.Path(workdir).absolute()
    self.best_metric = best_metric
    self.last = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "data", "config", "meta"))
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
          workdir / "best",
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_mode=best_mode,
              best_fn=lambda m: m[best_metric], keep_checkpoints_without_metrics=False,
              cleanup_tmp_directories=True),
          item_names=("state", "config", "meta"))

  def save(self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False,
           counters: dict | None = None):
    """Starts saving `step` (asynchronously; `wait` blocks until it is on disk).

    Args:
      step: the step number (the directory name).
      state: a pytree of arrays (any sharding).
      data_iter: a Grain iterator whose position is saved, or None.
      config: the resolved config (JSON-serialisable).
      force: save even if the manager's policy would skip this step.
      counters: small JSON values saved with the step (e.g. skipped steps), returned by
        `restore_latest`.
    """
    meta = _meta(state, config, counters)
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      args["data"] = grain.PyGrainCheckpointSave(data_iter)
      meta["data"] = _json_digest(data_iter.get_state())
    args["meta"] = ocp.args.JsonSave(meta)
    self.last.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state: Any, config: dict, metrics: dict[str, float]) -> bool:
    """Offers `step` to the best manager; returns True when it became the best."""
    if self.best is None or self.best_metric not in metrics:
      return False
    if step in self.best.all_steps():  # a resumed run repeating the evaluation of its step
      return False
    previous = self.best.best_step()
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(_meta(state, config, None))),
        metrics={k: float(v) for k, v in metrics.items()})
    self.best.wait_until_finished()
    return self.best.best_step() != previous and self.best.best_step() == step

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> Restored | None:
    """Restores the newest valid checkpoint; older ones are tried if the newest is damaged.

    Valid: every item reads and matches the checksums saved with it, on every process.
    Damaged steps newer than the one restored are renamed `<step>.unreadable`. A checkpoint
    written by another number of processes restores too: the state onto the shardings in
    `abstract_state`, the data iterator from process 0's state (see
    `_restore_data_from_other_process_count`).

    Returns:
      None when there is no checkpoint at all.

    Raises:
      RuntimeError: checkpoints exist but none is valid (the run must not start afresh over
        them).
    """
    steps = sorted(self.last.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      try:
        restored = self._restore_step(step, abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                    step, self.last.directory, type(e).__name__, _first_line(e))
        unreadable.append(step)
        continue
      if unreadable:
        log.warning("resumed from step %d, not the newest step %d", step, steps[0])
        self._set_aside(unreadable)
      return restored
    if steps:
      raise RuntimeError(
          f"none of the checkpoints {steps} in {self.last.directory} could be read (see the "
          "warnings above); refusing to restart from scratch over them. Move the folder away "
          "to start afresh on purpose, or point --config.init.resume at a good copy.")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps out of orbax's sight: the run rewrites those step numbers
    (orbax skips saving a step at or below its latest), and the bytes stay for inspection."""
    if jax.process_index() == 0:
      for step in steps:
        src = self.last.directory / str(step)
        dst, n = self.last.directory / f"{step}.unreadable", 1
        while dst.exists():
          dst, n = self.last.directory / f"{step}.unreadable{n}", n + 1
        src.rename(dst)
        log.warning("moved the unreadable checkpoint %s to %s (rename it back if the read "
                    "error was passing)", src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("hade_jax.checkpoints.set_aside")
    self.last.reload()

  def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Restored:
    """Restores and verifies `step`, or raises on every process alike (all processes must
    resume from the same step, and reach the collective checksum computation together)."""
    step_dir = self.last.directory / str(step)

    def read_meta():
      other_count = data_iter is not None and self._written_by_other_process_count(step)
      if not (step_dir / "meta").exists():
        log.warning("checkpoint step %d has no checksums (written by an older hade_jax); its "
                    "contents are not verified", step)
        return None, other_count
      meta = self.last.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
      if data_iter is not None:
        self._verify_data_files(step, meta, only_mine=not other_count)
      return meta, other_count

    def restore():
      args = {"state": ocp.args.StandardRestore(abstract_state),
              "config": ocp.args.JsonRestore()}
      if data_iter is not None and not other_count:
        args["data"] = grain.PyGrainCheckpointRestore(data_iter)
      restored = dict(self.last.restore(step, args=ocp.args.Composite(**args)))
      if other_count:
        restored["data"] = self._restore_data_from_other_process_count(step, data_iter)
      return restored

    meta, other_count = _agreed(read_meta)
    restored = _agreed(restore)
    if meta is not None:
      _agreed(lambda: _verify(step_dir, meta, restored["state"], restored["config"]))
    return Restored(step=step, state=restored["state"], data=restored.get("data"),
                    config=dict(restored["config"]),
                    counters=dict((meta or {}).get("counters") or {}))

  def _verify_data_files(self, step: int, meta: dict, *, only_mine: bool):
    files = sorted(self._data_dir(step).glob("process_*-of-*.json"))
    if only_mine:
      files = [self._data_dir(step) /
               f"process_{jax.process_index()}-of-{jax.process_count()}.json"]
    for f in files:
      # Every process's iterator state counts the same global batches (see
      # `_restore_data_from_other_process_count`), so one digest covers all files.
      if _json_digest(json.loads(f.read_text())) != meta.get("data"):
        raise CorruptCheckpointError(f"{f} does not match the checksum saved with it")

  def saved_config(self, step: int) -> dict:
    """The resolved config saved with `step` of the last-N manager."""
    return self.last.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def _data_dir(self, step: int) -> epath.Path:
    return self.last.directory / str(step) / "data"

  def _written_by_other_process_count(self, step: int) -> bool:
    mine = self._data_dir(step) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return not mine.is_file() and bool(list(self._data_dir(step).glob("process_*-of-*.json")))

  def _restore_data_from_other_process_count(self, step: int, data_iter: Any) -> Any:
    """Sets `data_iter` to the position saved by a run with another number of processes.

    The training pipeline deals whole batches to processes, so every process's iterator state
    counts the same global batches and holds the same value (checked); with the same global
    batch it is this process's position too (trainer._check_same_global_batch).
    """
    files = sorted(self._data_dir(step).glob("process_*-of-*.json"))
    states = {f.name: json.loads(f.read_text()) for f in files}
    first = next(iter(states.values()))
    if any(s != first for s in states.values()):
      raise ValueError(f"the data iterator states in {self._data_dir(step)} differ between "
                       f"processes ({states}); they cannot carry over to "
                       f"{jax.process_count()} processes")
    data_iter.set_state(first)
    if hasattr(data_iter, "start_prefetch"):
      data_iter.start_prefetch()
    log.warning("checkpoint step %d was written by %s process(es); %d continue(s) from the same "
                "global data position", step, files[0].stem.split("-of-")[1], jax.process_count())
    return data_iter

  def wait(self):
    self.last.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self):
    self.last.close()
    if self.best is not None:
      self.best.close()


def restore_state(directory: str | pathlib.Path, abstract_state: Any) -> tuple[int, Any]:
  """Restores only the train state from a checkpoint directory (`.../checkpoints` or `best`,
  or one step directory inside them)."""
  directory = pathlib.Path(directory).absolute()
  if (directory / "state").is_dir():  # one step directory
    step = int(directory.name)
    directory = directory.parent
  else:
    step = None
  with ocp.CheckpointManager(directory,
                             item_names=("state", "data", "config", "meta")) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    has_meta = (directory / str(step) / "meta").exists()
    if has_meta:
      args |= {"meta": ocp.args.JsonRestore(), "config": ocp.args.JsonRestore()}
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
  if has_meta:
    _verify(directory / str(step), restored["meta"], restored["state"], restored["config"])
  return step, restored["state"]


# ---------------------------------------------------------------------------------------------
# Checksums.


def _meta(state: Any, config: dict, counters: dict | None) -> dict:
  return {"format": META_FORMAT, "state": state_checksums(state),
          "config": _json_digest(config), "counters": dict(counters or {})}


def _verify(step_dir: epath.Path | pathlib.Path, meta: dict, state: Any, config: dict) -> None:
  """Raises CorruptCheckpointError unless `state` and `config` match `meta`'s checksums."""
  if meta.get("format") != META_FORMAT:
    raise CorruptCheckpointError(f"{step_dir}/meta has format {meta.get('format')!r}, "
                                 f"expected {META_FORMAT}")
  if _json_digest(config) != meta.get("config"):
    raise CorruptCheckpointError(f"{step_dir}/config does not match the checksum saved "
                                 "with it")
  saved, found = meta.get("state") or {}, state_checksums(state)
  bad = sorted(k for k in saved.keys() | found.keys() if saved.get(k) != found.get(k))
  if bad:
    raise CorruptCheckpointError(
        f"{len(bad)} of {len(saved)} arrays in {step_dir}/state do not match the checksums "
        f"saved with them: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")


def _agreed(fn):
  """fn(), or an exception on every process if it raised on any."""
  try:
    result, error = fn(), None
  except Exception as e:  # noqa: BLE001 - re-raised below, on every process
    result, error = None, e
  ok = error is None
  if jax.process_count() > 1:
    ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
  if error is not None:
    raise error
  if not ok:
    raise CorruptCheckpointError("unreadable on another process (see its log)")
  return result


def _json_digest(value: Any) -> str:
  if isinstance(value, bytes | str):  # Grain's DataLoader iterators give JSON bytes
    value = json.loads(value)
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:500] if text else ""


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
  return {_path_name(path): f"0x{int(v):08x}"
          for (path, _), v in zip(leaves, sums, strict=True)}


def _path_name(path) -> str:
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

