"""Faults on purpose, the short versions of `python -m tools.fault_harness` (RELIABILITY.md).

Training killed with SIGKILL (before the first checkpoint, during a checkpoint write, at a
random time) and rerun ends bit-identical to an uninterrupted run; a damaged newest checkpoint
is skipped with a warning, all damaged refuses; a NaN stops (or, opted in, is skipped); a
killed dataset preparation completes with the same records.
"""

import json
import logging
import math
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from hade_jax import checkpoints, trainer
from tests import reliability_helpers as fh  # the fault functions (fh: fault helpers)

# -- Kill and resume ----------------------------------------------------------------------------


def test_training_killed_three_times_ends_bit_identical(tiny_data, minilm_dir, tmp_path):
  overrides = dict(total_steps=8, checkpoint_every_steps=1, keep_checkpoints=3)
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  env = fh.train_env()  # the session's compilation cache: restarts load the step
  fh.run(fh.train_command(reference, tiny_data, minilm_dir, **overrides),
         tmp_path / "reference.log", env=env)
  command = fh.train_command(killed, tiny_data, minilm_dir, **overrides)
  modes = ["first step", "checkpoint write", "random"]
  kills, _ = fh.kill_and_resume(command, killed, modes, random.Random(0), tmp_path, env=env,
                                total_steps=8)
  assert [k.mode for k in kills] == modes, kills
  assert kills[0].phase == "before the first checkpoint" and kills[0].checkpoints == [], kills
  assert kills[1].phase == "checkpoint write" and kills[1].partial, kills
  same = fh.assert_same_run(reference, killed, 8)
  assert same["repeated_steps"] >= 1  # the rerun steps logged the same clips again
  assert same["leftover_partial"] == []  # orbax's temporary folders were cleaned up


# -- Damaged checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(fh.DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_a_warning(kind, tmp_path, caplog):
  caplog.set_level(logging.WARNING, logger="hade_jax.checkpoints")
  result = fh.damaged_checkpoint_falls_back(tmp_path, kind)
  assert result["restored"] == 2
  assert "resumed from step 2, not the newest step 3" in caplog.text
  if kind in ("overwritten", "data position"):  # only the checksums notice these
    assert "match the checksum" in result["reason"]
  # The step set aside is written again by the resumed run (orbax skips existing steps).
  ckpt = checkpoints.Checkpoints(tmp_path, keep=10, best_metric=None)
  ckpt.save(3, fh.small_state(3), fh.data_iterator(3), {"batch_size": 8, "step": 3})
  ckpt.wait()
  ckpt.close()
  restored, _ = fh.restore_small(tmp_path)
  assert restored.step == 3
  fh.assert_bit_identical(jax.device_get(restored.state), jax.device_get(fh.small_state(3)))


def test_all_checkpoints_damaged_refuses_to_start_afresh(tmp_path):
  message = fh.all_damaged_refuses(tmp_path)
  assert "none of the checkpoints [2, 1]" in message


def test_orbax_alone_restores_overwritten_bytes_silently(tmp_path):
  # Why checkpoints carry checksums: without them the damage goes unnoticed.
  assert fh.orbax_alone_misses_overwritten_bytes(tmp_path)


def test_checksums_do_not_depend_on_the_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1), ("data",))
  sharded, single = fh.small_state(5, mesh), fh.small_state(5)
  assert sharded.params["emb"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert checkpoints.state_checksums(sharded) == checkpoints.state_checksums(single)
  moved = single.replace(params=dict(single.params, b=single.params["b"][::-1]))
  changed = checkpoints.state_checksums(moved)
  assert [k for k, v in changed.items() if v != checkpoints.state_checksums(single)[k]] == [
      "params/b"]


def test_init_resume_verifies_checksums(tmp_path):
  fh.save_small_checkpoints(tmp_path, [1])
  abstract = fh.abstract_small_state()
  step, _ = checkpoints.restore_state(tmp_path / "checkpoints", abstract)
  assert step == 1
  fh.damage(tmp_path / "checkpoints" / "1", "overwritten")
  with pytest.raises(checkpoints.CorruptCheckpointError, match="params/emb"):
    checkpoints.restore_state(tmp_path / "checkpoints" / "1", abstract)


# -- NaN ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_stop_run(tiny_data, minilm_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nan_stop")
  return workdir, fh.nan_stops(tiny_data, minilm_dir, workdir)


def test_nan_stops_naming_the_steps_and_keeps_the_last_good_checkpoint(nan_stop_run):
  workdir, result = nan_stop_run
  assert result["checkpoints"] == [1, 2]
  assert "between steps 2 and 3" in result["message"]
  assert "skip_nonfinite_steps" in result["message"]
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(x["step"] for x in lines) == 2


def test_nan_skip_mode_skips_counts_and_matches_the_normal_step(nan_stop_run, tiny_data,
                                                                 minilm_dir, tmp_path):
  result = fh.nan_skipped(tiny_data, minilm_dir, tmp_path)
  assert result["skipped_steps"] == 1
  # Before the NaN the skip mode's step is the normal step, bit for bit.
  stop_dir, _ = nan_stop_run
  fh.assert_bit_identical(fh.read_state(tmp_path, 2), fh.read_state(stop_dir, 2))


def _reporter(**config):
  cfg = fh.nan_config("", "", **config)
  counters = {"skipped_steps": 0, "consecutive_skips": 0}
  return trainer.Reporter(None, trainer.Timer(0), 10, cfg, lambda step: {}, counters), counters


def test_reporter_caps_skips_in_a_row_and_names_the_state():
  report, counters = _reporter(skip_nonfinite_steps=True, max_consecutive_skips=2)
  nan, ok = {"loss": math.nan, "grad_norm": 1.0, "finite": False}, {
      "loss": 1.0, "grad_norm": 1.0, "finite": True}
  report((4, nan))
  report((5, ok))
  report((6, nan))
  assert counters == {"skipped_steps": 2, "consecutive_skips": 1}
  with pytest.raises(trainer.NonFiniteError, match=r"2 steps in a row \(steps 6\.\.7\)"):
    report((7, nan))
  stop, _ = _reporter()
  with pytest.raises(trainer.NonFiniteError,
                     match="non-finite parameters or batch-norm statistics "
                           "after the update between steps 8 and 9"):
    stop((9, {"loss": 1.0, "grad_norm": 1.0, "finite": False}))


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"st')
  with trainer.open_jsonl(path) as f:
    f.write('{"step": 3}\n')
  assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]


# -- Interrupted preparation --------------------------------------------------------------------


def test_preparation_killed_mid_shard_completes_with_the_same_records(tmp_path):
  reference = tmp_path / "reference"
  _, _, seconds = fh.run(fh.prepare_command(reference), tmp_path / "reference.log")
  modes = ["generating audio", "mid-shard", "mid-shard", "random"]
  result = fh.kill_prepare_and_resume(reference, tmp_path / "killed", modes, random.Random(0),
                                      seconds)
  assert [k["mode"] for k in result["kills"]] == modes
  assert "mid-shard" in [k["phase"] for k in result["kills"]]
  assert result["clips"] == {"train": 24, "validation": 6, "test": 6}


def test_reliability_md_tables_are_the_saved_results(tmp_path):
  # The harness rewrites only the marked tables, from its JSON: rerendering changes nothing.
  out = tmp_path / "RELIABILITY.md"
  shutil.copy(fh.ROOT / "RELIABILITY.md", out)
  subprocess.run([sys.executable, "-m", "tools.fault_harness", "--render_only", f"--out={out}"],
                 cwd=fh.ROOT, check=True, env=fh.train_env())
  assert out.read_text() == (fh.ROOT / "RELIABILITY.md").read_text()
  assert "<!-- table:faults -->\n| fault | tries | outcome |" in out.read_text()
