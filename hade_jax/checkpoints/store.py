"""The orbax side: the managers that save a workdir's steps, and the one verified reader.

Every read of a state (`read_state`; `load` for inference, `restore_state` for
`config.init.resume`, `Checkpoints.restore_latest` for resume) goes through `_read_verified`:
the arrays are restored, then checked against the checksums saved with them
(`integrity.verify`), so a damaged checkpoint is refused with `CorruptCheckpointError` naming
the arrays, whoever reads it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from hade_jax.checkpoints import frozen, integrity, paths

log = logging.getLogger("hade_jax.checkpoints")

CorruptCheckpointError = integrity.CorruptCheckpointError


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
               best_mode: str = "max", frozen_params: Any = None):
    """
    Args:
      frozen_params: a pytree of bools shaped like the parameters: the True leaves never
        change in this run and are stored once, in `<workdir>/frozen` (see `frozen`).
    """
    workdir = pathlib.Path(workdir).absolute()
    self.workdir = workdir
    self.best_metric = best_metric
    self._frozen = frozen.names(frozen_params) if frozen_params is not None else frozenset()
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
    state, meta = self._stub(state, config, counters)
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      import grain.python as grain  # only a training run saves an iterator

      args["data"] = grain.PyGrainCheckpointSave(data_iter)
      meta["data"] = integrity.json_digest(data_iter.get_state())
    args["meta"] = ocp.args.JsonSave(meta)
    self.last.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state: Any, config: dict, metrics: dict[str, float]) -> bool:
    """Offers `step` to the best manager; returns True when it became the best."""
    if self.best is None or self.best_metric not in metrics:
      return False
    if step in self.best.all_steps():  # a resumed run repeating the evaluation of its step
      return False
    previous = self.best.best_step()
    state, meta = self._stub(state, config, None)
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
        meta=ocp.args.JsonSave(meta)),
        metrics={k: float(v) for k, v in metrics.items()})
    self.best.wait_until_finished()
    return self.best.best_step() != previous and self.best.best_step() == step

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def _stub(self, state: Any, config: dict, counters: dict | None) -> tuple[Any, dict]:
    """(what a step saves of `state`, its meta): frozen leaves go to the workdir's store."""
    if not self._frozen:
      return state, integrity.make_meta(state, config, counters)
    frozen_meta = frozen.save_once(self.workdir, state, self._frozen)
    state = frozen.stub(state, self._frozen)
    return state, integrity.make_meta(state, config, counters) | {"frozen": frozen_meta}

  def step_dir(self, step: int) -> pathlib.Path:
    """The directory of `step` of the last-N manager."""
    return pathlib.Path(str(self.last.directory)) / str(step)

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> Restored | None:
    """Restores the newest valid checkpoint; older ones are tried if the newest is damaged.

    Valid: every item reads and matches the checksums saved with it, on every process.
    Damaged steps newer than the one restored are renamed `<step>.unreadable` (orbax would
    otherwise skip rewriting those step numbers). A checkpoint written by another number of
    processes restores too: the state onto the shardings in `abstract_state`, the data
    iterator from the position all processes saved (see `_restore_data`).

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

  def _restore_step(self, step: int, abstract_state: Any, data_iter: Any) -> Restored:
    """Restores and verifies `step`, or raises on every process alike (all processes must
    resume from the same step)."""
    step_dir = self.step_dir(step)
    state, meta = _read_verified(step_dir, abstract_state, partial=False)
    config = _agreed(lambda: paths.saved_config(step_dir))
    data = None
    if data_iter is not None:
      data = _agreed(lambda: _restore_data(step_dir / "data", data_iter, meta))
    return Restored(step=step, state=state, data=data, config=config,
                    counters=dict((meta or {}).get("counters") or {}))

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable steps out of orbax's sight: the run rewrites those step numbers
    (orbax skips saving a step at or below its latest), and the bytes stay for inspection."""
    if jax.process_index() == 0:
      for step in steps:
        src = self.step_dir(step)
        dst, n = src.with_name(f"{step}.unreadable"), 1
        while dst.exists():
          dst, n = src.with_name(f"{step}.unreadable{n}"), n + 1
        src.rename(dst)
        log.warning("moved the unreadable checkpoint %s to %s (rename it back if the read "
                    "error was passing)", src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("hade_jax.checkpoints.set_aside")
    self.last.reload()

  def wait(self):
    self.last.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self):
    self.last.close()
    if self.best is not None:
      self.best.close()


# ---------------------------------------------------------------------------------------------
# Reading: one verified reader.


def load(path: str | os.PathLike, target: Any, *, which: str = "best") -> Any:
  """Inference weights: the arrays of `target` read from the checkpoint `path` points at.

  Args:
    path: a workdir, a manager directory or a step directory (see `paths.step_dir`).
    target: a part of the saved train state as ShapeDtypeStructs (with the shardings to
      restore onto), e.g. {'params': ..., 'rest': ...}: the optimizer state is not read.
    which: for a workdir, 'best' or 'last'.

  Raises:
    CorruptCheckpointError: an array read does not match the checksum saved with it.
  """
  return _read_verified(paths.step_dir(path, which), target, partial=True)[0]


def read_state(step_dir: str | os.PathLike, target: Any = None) -> Any:
  """The whole train state saved in a step directory, verified.

  Args:
    step_dir: `<workdir>/checkpoints/<step>` (or `best/<step>`).
    target: ShapeDtypeStructs with the shardings to restore onto; None: numpy arrays in the
      saved structure (whatever mesh wrote them).
  """
  return _read_verified(pathlib.Path(step_dir), target, partial=False)[0]


def restore_state(directory: str | os.PathLike, abstract_state: Any) -> tuple[int, Any]:
  """(step, train state) from a checkpoint directory (`.../checkpoints` or `best`, its
  newest step, or one step directory inside them), verified."""
  directory = pathlib.Path(directory).absolute()
  step_dir = directory if (directory / "state").is_dir() else paths.latest_step(directory)
  if step_dir is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  return int(step_dir.name), read_state(step_dir, abstract_state)


def _read_verified(step_dir: pathlib.Path, target: Any, *, partial: bool) -> tuple[Any, dict]:
  """(state, meta): the arrays restored and checked against their checksums, agreed by all
  processes (they must reach the collective checksum computation together)."""
  meta = _agreed(lambda: paths.read_meta(step_dir))
  frozen_meta = (meta or {}).get("frozen")
  stubbed = target
  if frozen_meta and target is not None:
    stubbed = frozen.stub(target, set(frozen_meta["names"]))
  state = _agreed(lambda: _restore_arrays(step_dir / "state", stubbed, partial=partial))
  if meta is not None:
    _agreed(lambda: integrity.verify(step_dir, meta, state=state, partial=partial))
  if frozen_meta:
    state = _agreed(lambda: frozen.fill(state, step_dir, frozen_meta, target, _restore_arrays))
  return state, meta


def _restore_arrays(path: pathlib.Path, target: Any, *, partial: bool) -> Any:
  with ocp.PyTreeCheckpointer() as checkpointer:
    if target is None:
      tree = checkpointer.metadata(path).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial))


def _restore_data(data_dir: pathlib.Path, data_iter: Any, meta: dict | None) -> Any:
  """Sets `data_iter` to the position saved in `data_dir` (checked against `meta`).

  A run with another number of processes restores too: the training pipeline deals whole
  batches to processes, so every process's iterator state counts the same global batches and
  holds the same value (checked); with the same global batch it is this process's position
  too (trainer._check_same_global_batch).
  """
  import grain.python as grain  # only a training run restores an iterator

  mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  files = [mine] if mine.is_file() else sorted(data_dir.glob("process_*-of-*.json"))
  if not files:
    raise FileNotFoundError(f"{data_dir} holds no data iterator position")
  texts = {f: f.read_text() for f in files}
  for f, text in texts.items():
    if meta is not None and integrity.json_digest(text) != meta.get("data"):
      raise CorruptCheckpointError(f"{f} does not match the checksum saved with it")
  states = {f.name: json.loads(text) for f, text in texts.items()}
  first = next(iter(states.values()))
  if any(s != first for s in states.values()):
    raise ValueError(f"the data iterator states in {data_dir} differ between processes "
                     f"({states}); they cannot carry over to {jax.process_count()} processes")
  data_iter.set_state(first if isinstance(data_iter, grain.DatasetIterator)
                      else texts[files[0]].encode())
  data_iter.start_prefetch()
  if files != [mine]:
    log.warning("checkpoint %s was written by %s process(es); %d continue(s) from the same "
                "global data position", data_dir.parent, files[0].stem.split("-of-")[1],
                jax.process_count())
  return data_iter


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


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:500] if text else ""
