"""Checkpoints: the checksums alone, and a damaged checkpoint refused by every reader (the API,
`python -m hade_jax.eval`, `python -m hade_jax.search index`)."""

import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from hade_jax import api, checkpoints, search
from hade_jax import eval as hade_eval
from hade_jax.checkpoints import integrity
from tests import reliability_helpers as fh
from tests.tiny_train_config import save_random_checkpoint

# -- Integrity alone ----------------------------------------------------------------------------


def _state() -> dict:
  rng = np.random.default_rng(0)
  return {"step": jnp.array(7, jnp.int32),
          "params": {"w": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32)),
                     "b": jnp.asarray(rng.normal(size=(8,)).astype(np.float32))},
          "opt_state": {"mu": jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))}}


def test_checksum_changes_when_one_element_changes():
  state = _state()
  before = integrity.state_checksums(state)
  assert sorted(before) == ["opt_state/mu", "params/b", "params/w", "step"]
  for i, j in [(0, 0), (15, 7), (3, 5)]:
    w = state["params"]["w"]
    changed = dict(state, params=dict(state["params"], w=w.at[i, j].set(w[i, j] + 1e-7)))
    after = integrity.state_checksums(changed)
    assert [k for k in before if before[k] != after[k]] == ["params/w"], (i, j)
  # Two elements swapped: the same values, other places.
  w = state["params"]["w"]
  swapped = w.at[0, 0].set(w[0, 1]).at[0, 1].set(w[0, 0])
  assert integrity.state_checksums(swapped) != integrity.state_checksums(w)


def test_checksums_equal_across_shardings():
  state = _state()
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  specs = {"step": jax.sharding.PartitionSpec(),
           "params": {"w": jax.sharding.PartitionSpec("data", "fsdp"),
                      "b": jax.sharding.PartitionSpec("fsdp")},
           "opt_state": {"mu": jax.sharding.PartitionSpec(None, "data")}}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
                         state, specs)
  assert sharded["params"]["w"].sharding.spec == jax.sharding.PartitionSpec("data", "fsdp")
  as_numpy = jax.tree.map(np.asarray, state)
  assert (integrity.state_checksums(sharded) == integrity.state_checksums(state)
          == integrity.state_checksums(as_numpy))


def test_verify_names_the_damaged_arrays():
  state, config = _state(), {"batch_size": 8}
  meta = integrity.make_meta(state, config, {"skipped_steps": 1})
  integrity.verify("step", meta, state=state, config=config)
  bad = dict(state, params={"w": state["params"]["w"] * 2, "b": state["params"]["b"] + 1})
  with pytest.raises(integrity.CorruptCheckpointError,
                     match=r"2 of 4 arrays read from step/state .*: params/b, params/w"):
    integrity.verify("step", meta, state=bad)
  with pytest.raises(integrity.CorruptCheckpointError, match="step/config"):
    integrity.verify("step", meta, config={"batch_size": 9})
  # A part of the state (inference reads no optimizer state): only what was read is checked.
  integrity.verify("step", meta, state={"params": state["params"]}, partial=True)
  with pytest.raises(integrity.CorruptCheckpointError, match="params/b"):
    integrity.verify("step", meta, state={"params": bad["params"]}, partial=True)
  # An array read without a saved checksum is refused too; the whole state must be complete.
  extra = {"params": dict(state["params"], new=jnp.zeros(3))}
  with pytest.raises(integrity.CorruptCheckpointError, match="params/new"):
    integrity.verify("step", meta, state=extra, partial=True)
  with pytest.raises(integrity.CorruptCheckpointError, match="opt_state/mu"):
    integrity.verify("step", meta, state={k: state[k] for k in ("step", "params")})


# -- Reading ------------------------------------------------------------------------------------


def test_read_state_verifies_and_a_checkpoint_without_checksums_only_warns(tmp_path, caplog):
  fh.save_small_checkpoints(tmp_path, [1])
  step_dir = tmp_path / "checkpoints" / "1"
  fh.assert_bit_identical(checkpoints.read_state(step_dir), jax.device_get(fh.small_state(1)))
  shutil.rmtree(step_dir / "meta")  # as written by a hade_jax without checksums
  caplog.set_level(logging.WARNING, logger="hade_jax.checkpoints")
  fh.assert_bit_identical(checkpoints.read_state(step_dir), jax.device_get(fh.small_state(1)))
  assert "has no checksums" in caplog.text


def test_damaged_checkpoint_refused_by_read_state(tmp_path):
  fh.save_small_checkpoints(tmp_path, [1])
  fh.damage(tmp_path / "checkpoints" / "1", "overwritten")
  with pytest.raises(checkpoints.CorruptCheckpointError, match="params/emb"):
    checkpoints.read_state(tmp_path / "checkpoints" / "1")


# -- A damaged checkpoint in the API, evaluation and search -------------------------------------


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, minilm_dir) -> pathlib.Path:
  """A workdir whose only checkpoint (a random tiny HADE) has overwritten parameter bytes."""
  workdir = save_random_checkpoint(tmp_path_factory.mktemp("damaged"), minilm_dir)
  fh.damage(workdir / "checkpoints" / "0", "overwritten")
  return workdir


def test_damaged_checkpoint_refused_by_the_api(damaged):
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=r"arrays read from .*checkpoints/0/state do not match .*params/"):
    api.Hade.load(damaged)


def test_damaged_checkpoint_refused_by_eval_writing_no_metrics(damaged, shared_data, tmp_path):
  out = tmp_path / "eval"
  csv_path = shared_data / "caption_eval21" / "caption_eval21.csv"
  with pytest.raises(checkpoints.CorruptCheckpointError, match="params/"):
    hade_eval.main([f"--checkpoint={damaged}", f"--csv={csv_path}", f"--out={out}"])
  assert not out.exists()
  assert not (damaged / "eval").exists()


def test_damaged_checkpoint_refused_by_search_index_writing_no_index(damaged, tmp_path):
  audio_dir, out = tmp_path / "audio", tmp_path / "index"
  audio_dir.mkdir()
  soundfile.write(audio_dir / "tone.wav", np.sin(np.arange(16_000) / 10.0).astype(np.float32),
                  16_000)
  with pytest.raises(checkpoints.CorruptCheckpointError, match="params/"):
    search.main(["index", f"--checkpoint={damaged}", f"--audio_dir={audio_dir}",
                 f"--out={out}", "--no_progress"])
  assert not (out / search.MANIFEST).exists()
  assert not out.exists() or not any(out.rglob("*.npy"))
