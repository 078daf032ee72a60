"""Frozen parameters are stored once per workdir (hade_jax/checkpoints/frozen.py): each step
holds placeholders, every read fills the values back exactly, and a missing, damaged or foreign
store is refused."""

import jax
import numpy as np
import pytest

from hade_jax import checkpoints
from tests import reliability_helpers as fh

FROZEN = {"w": False, "b": False, "emb": True}  # 'emb' is 256 KiB: most of the state


def _save(workdir, steps, seed=0, frozen=FROZEN):
  ckpt = checkpoints.Checkpoints(workdir, keep=10, best_metric="m", frozen_params=frozen)
  for step in steps:
    state = fh.small_state(seed).replace(step=jax.numpy.array(step, jax.numpy.int32))
    ckpt.save(step, state, None, {"step": step})
    ckpt.save_best(step, state, {"step": step}, {"m": float(step)})
  ckpt.wait()
  ckpt.close()
  return fh.small_state(seed)


def _bytes(path):
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_frozen_store_written_once_and_every_read_is_exact(tmp_path):
  state = _save(tmp_path, [1, 2])
  # The frozen array is in the store only: each step is far smaller than the store.
  store = tmp_path / "frozen"
  assert (store / "meta.json").is_file()
  for step in (1, 2):
    assert _bytes(tmp_path / "checkpoints" / str(step) / "state") < _bytes(store) / 4
  # Numpy reads, restores onto shardings and partial loads all see the real values.
  read = checkpoints.read_state(tmp_path / "checkpoints" / "2")
  np.testing.assert_array_equal(read["params"]["emb"], np.asarray(state.params["emb"]))
  np.testing.assert_array_equal(read["params"]["w"], np.asarray(state.params["w"]))
  abstract = jax.eval_shape(lambda: state)
  step, restored = checkpoints.restore_state(tmp_path / "best", abstract)
  assert step == 2
  fh.assert_bit_identical(restored.replace(step=state.step), state)
  loaded = checkpoints.load(tmp_path, {"params": abstract.params}, which="last")
  np.testing.assert_array_equal(np.asarray(loaded["params"]["emb"]),
                                np.asarray(state.params["emb"]))


def test_frozen_store_missing_or_damaged_is_refused(tmp_path):
  _save(tmp_path, [1])
  step_dir = tmp_path / "checkpoints" / "1"
  data = max((p for p in (tmp_path / "frozen" / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(checkpoints.CorruptCheckpointError):
    checkpoints.read_state(step_dir)
  (tmp_path / "frozen").rename(tmp_path / "elsewhere")
  with pytest.raises(checkpoints.CorruptCheckpointError, match="frozen parameters in .*missing"):
    checkpoints.read_state(step_dir)


def test_frozen_store_of_another_run_is_refused(tmp_path):
  _save(tmp_path / "a", [1], seed=0)
  _save(tmp_path / "b", [1], seed=1)
  (tmp_path / "a" / "frozen").rename(tmp_path / "a" / "frozen_a")
  (tmp_path / "b" / "frozen").rename(tmp_path / "a" / "frozen")
  with pytest.raises(checkpoints.CorruptCheckpointError, match="does not hold the frozen"):
    checkpoints.read_state(tmp_path / "a" / "checkpoints" / "1")
  # Saving other frozen values into a workdir is refused rather than mixing two runs.
  with pytest.raises(RuntimeError, match="cannot change within a workdir"):
    _save(tmp_path / "a", [2], seed=0)


def test_no_frozen_group_writes_no_store(tmp_path):
  state = _save(tmp_path, [1], frozen=None)
  assert not (tmp_path / "frozen").exists()
  read = checkpoints.read_state(tmp_path / "checkpoints" / "1")
  np.testing.assert_array_equal(read["params"]["emb"], np.asarray(state.params["emb"]))
