"""Multi-process training on one machine: two processes (CPU devices, Gloo collectives) train
exactly like one process with the same global batch, and their checkpoint resumes in one
process on another mesh. Plus how `distributed.plan` reads flags and the environment.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from hade_jax import distributed, trainer
from tests.processes import ROOT, run_in_processes
from tests.reliability_helpers import read_state  # numpy arrays, whatever mesh wrote them
from tests.tiny_train_config import tiny_config

# Adam's update is ~sign(g) * lr with eps=1e-8, which turns float noise of the reduction order
# (Gloo vs in-process all-reduce, another mesh) in near-zero gradients into differences of order
# lr. With eps=1e-3 the update is Lipschitz in g (|d update| <= lr / eps |d g| = |d g|), so the
# whole state stays within float noise: measured at most 3e-7 on parameters, 6e-6 on Adam's
# first moment and 1 ulp (8e-6 at ~100) on the batch-norm variance after six steps. The
# tolerance below is 3x that; dealing the global batch to processes in another order (other
# dropout masks per clip) moved parameters by 6e-3 and the state by 0.1.
OVERRIDES = {"total_steps": 6, "checkpoint_every_steps": 3, "eval_every_steps": 3,
             "log_batch_ids": True, "optim.eps": 1e-3}
ATOL, RTOL = 2e-5, 1e-5


def assert_trees_close(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(flat_a) == len(flat_b) > 0
  for path, x in flat_a:
    np.testing.assert_allclose(np.asarray(x), np.asarray(flat_b[path]), atol=ATOL, rtol=RTOL,
                               err_msg=jax.tree_util.keystr(path))


def jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def train_in_processes(workdir: pathlib.Path, overrides: dict, *, processes: int,
                       devices_per_process: int) -> None:
  """`python -m hade_jax.train` in `processes` local processes joined by a coordinator."""
  args = [f"--config={ROOT}/tests/tiny_train_config.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  run_in_processes("hade_jax.train", args, workdir, processes=processes,
                   devices_per_process=devices_per_process)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_on_another_mesh(
    tiny_data, minilm_dir, tmp_path):
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  paths = {"data.data_dir": str(tiny_data), "data.tokenizer_dir": str(minilm_dir)}
  two, one = tmp_path / "two", tmp_path / "one"

  # 2 processes x 4 devices, global batch 8 (4 per process), stopping at step 3 of 6.
  train_in_processes(two, paths | OVERRIDES | {"max_steps_per_run": 3}, processes=2,
                     devices_per_process=4)
  # 1 process x 8 devices (this one), the same global batch, six steps straight.
  trainer.train_and_evaluate(tiny_config(tiny_data, minilm_dir, **OVERRIDES), one)

  # The same clips, in the same order, at every step...
  assert [b["clip_id"] for b in jsonl(two / "batches.jsonl")] == [
      b["clip_id"] for b in jsonl(one / "batches.jsonl")][:3]
  # ...so the same parameters, optimizer state and batch-norm statistics,
  assert_trees_close(read_state(two, 3), read_state(one, 3))
  # and the same validation metrics from the multi-process evaluation at step 3.
  val_two = [m for m in jsonl(two / "metrics.jsonl") if "val/t2a/R@1" in m]
  val_one = [m for m in jsonl(one / "metrics.jsonl") if "val/t2a/R@1" in m and m["step"] == 3]
  assert len(val_two) == len(val_one) == 1
  for key, value in val_one[0].items():
    assert val_two[0][key] == pytest.approx(value, abs=1e-4), key
  # Every process wrote its data position; summaries came from process 0 alone (once a step).
  data_files = sorted(p.name for p in (two / "checkpoints" / "3" / "data").glob("process_*"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
  assert [m["step"] for m in jsonl(two / "metrics.jsonl") if "train/loss" in m] == [1, 2, 3]

  # Resume the two-process checkpoint here: one process, 8 devices, a 4 x 2 (data x fsdp) mesh.
  trainer.train_and_evaluate(
      tiny_config(tiny_data, minilm_dir, mesh=(("data", 4), ("fsdp", 2)), **OVERRIDES), two)
  assert [b["clip_id"] for b in jsonl(two / "batches.jsonl")] == [
      b["clip_id"] for b in jsonl(one / "batches.jsonl")]
  assert [b["step"] for b in jsonl(two / "batches.jsonl")] == list(range(1, 7))
  assert_trees_close(read_state(two, 6), read_state(one, 6))
  assert (two / "checkpoints" / "6" / "data" / "process_0-of-1.json").is_file()
  assert json.loads((two / "test_metrics.json").read_text())["metrics"] == pytest.approx(
      json.loads((one / "test_metrics.json").read_text())["metrics"], abs=1e-4)

  # Another global batch would put the data position elsewhere: refused before any step.
  config = tiny_config(tiny_data, minilm_dir, **(OVERRIDES | {"total_steps": 8,
                                                              "batch_size": 16}))
  with pytest.raises(ValueError, match=r"batch_size=8 but this run asks for 16.*init\.resume"):
    trainer.train_and_evaluate(config, two)
  assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [3, 6]


# -- distributed.plan: flags > JAX_* environment > Slurm > Cloud TPU detection > single --------


def test_single_process_when_nothing_is_set():
  assert distributed.plan(environ={}).mode == "single"
  assert distributed.plan(num_processes=1, environ={}).mode == "single"


def test_flags_win_over_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "envhost:1", "JAX_NUM_PROCESSES": "8",
         "JAX_PROCESS_ID": "1"}
  p = distributed.plan("flaghost:1234", 2, 0, environ=env)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      "explicit", "flaghost:1234", 2, 0)
  p = distributed.plan(None, 2, None, environ=env)
  assert (p.coordinator_address, p.num_processes, p.process_id) == ("envhost:1", 2, 1)
  assert "num_processes from --num_processes" in p.source
  assert "process_id from JAX_PROCESS_ID" in p.source


def test_slurm_step_environment():
  env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[007-010],cpu1"}
  p = distributed.plan(environ=env)
  assert (p.mode, p.coordinator_address, p.num_processes, p.process_id) == (
      "explicit", f"gpu007:{4242 % 4096 + 61440}", 4, 3)
  # The launcher's explicit coordinator and port win over the derived ones.
  p = distributed.plan(environ=env | {"JAX_COORDINATOR_ADDRESS": "10.0.0.5:5555"})
  assert p.coordinator_address == "10.0.0.5:5555"
  p = distributed.plan(environ=env | {"JAX_COORDINATOR_PORT": "7000"})
  assert p.coordinator_address == "gpu007:7000"
  # The batch script itself (no step) is one process.
  batch = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}
  assert distributed.plan(environ=batch).mode == "single"


@pytest.mark.parametrize("nodelist, host", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[003-005,9]", "gpu003"),
    ("gpu[12,14]-ib,x", "gpu12-ib"), ("h[1-2],g[3-4]", "h1")])
def test_first_slurm_host(nodelist, host):
  assert distributed.first_slurm_host(nodelist) == host


def test_cloud_tpu_detection_only_when_nothing_is_set():
  assert distributed.plan(environ={}, on_cloud_tpu=True).mode == "cloud_tpu"
  p = distributed.plan("h:1", 2, 0, environ={}, on_cloud_tpu=True)
  assert p.mode == "explicit"


def test_incomplete_or_inconsistent_settings_say_what_is_missing():
  with pytest.raises(ValueError, match=r"missing coordinator_address.*JAX_COORDINATOR_ADDRESS"):
    distributed.plan(num_processes=2, process_id=0, environ={})
  with pytest.raises(ValueError, match=r"missing process_id: set --process_id=I"):
    distributed.plan(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    distributed.plan("h:1", 2, 2, environ={})
  with pytest.raises(ValueError, match="must be HOST:PORT"):
    distributed.plan("h", 2, 0, environ={})
  with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.plan(environ={"JAX_NUM_PROCESSES": "two"})
