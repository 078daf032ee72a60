"""Orbax checkpoints that resume exactly: train state + Grain iterator state + resolved config.

Layout of a workdir:
  checkpoints/<step>/{state, data, config}   the last `keep` steps (every process writes)
  best/<step>/{state, config}                the best step by the validation metric

Resume order (trainer.train_and_evaluate): an existing checkpoint in the workdir, then
`config.init.resume` (a checkpoint directory), then pretrained imports, then scratch.
A damaged newest checkpoint is skipped with a warning in favour of the newest valid one; the
run never silently starts from scratch while checkpoints exist.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
  """The last-N manager and the best-by-metric manager of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, best_metric: str | None,
               best_mode: str = "max"):
    workdir = pathlib.Path(workdir).absolute()
    self.best_metric = best_metric
    self.last = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data", "config"))
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
          workdir / "best",
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_mode=best_mode,
              best_fn=lambda m: m[best_metric], keep_checkpoints_without_metrics=False),
          item_names=("state", "config"))

  def save(self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False):
    args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
    if data_iter is not None:
      args["data"] = grain.PyGrainCheckpointSave(data_iter)
    self.last.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state: Any, config: dict, metrics: dict[str, float]) -> bool:
    """Offers `step` to the best manager; returns True when it became the best."""
    if self.best is None or self.best_metric not in metrics:
      return False
    previous = self.best.best_step()
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)),
        metrics={k: float(v) for k, v in metrics.items()})
    self.best.wait_until_finished()
    return self.best.best_step() != previous and self.best.best_step() == step

  def latest_step(self) -> int | None:
    return self.last.latest_step()

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[int, Any, Any] | None:
    """Restores the newest readable checkpoint; older ones are tried if the newest is damaged.

    A checkpoint written by another number of processes restores too: the state onto the
    shardings in `abstract_state`, the data iterator from process 0's state (see
    `_restore_data_from_other_process_count`).
    """
    steps = sorted(self.last.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        other_count = data_iter is not None and self._written_by_other_process_count(step)
        if data_iter is not None and not other_count:
          args["data"] = grain.PyGrainCheckpointRestore(data_iter)
        restored = self.last.restore(step, args=ocp.args.Composite(**args))
        if other_count:
          restored = dict(restored, data=self._restore_data_from_other_process_count(
              step, data_iter))
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
        log.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an older one",
                    step, self.last.directory, type(e).__name__, e)
        continue
      if i:
        log.warning("resumed from step %d, not the newest step %d", step, steps[0])
      return step, restored["state"], restored.get("data")
    if steps:
      raise RuntimeError(f"none of the checkpoints {steps} in {self.last.directory} could be "
                         "read; refusing to restart from scratch over them")
    return None

  def saved_config(self, step: int) -> dict:
    """The resolved config saved with `step` of the last-N manager."""
    return self.last.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def _data_dir(self, step: int) -> pathlib.Path:
    return pathlib.Path(self.last.directory) / str(step) / "data"

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
  with ocp.CheckpointManager(directory, item_names=("state", "data", "config")) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  return step, restored["state"]

