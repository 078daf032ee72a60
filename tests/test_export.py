"""Portable model folders (`Hade.save` / `Hade.load`, `python -m hade_jax.export`) and the
Hugging Face ClapModel export.

One tiny training run (checkpoints/2, checkpoints/4, best/2) is shared by the module;
the ClapModel round trip builds a small random ClapModel (no download).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hade_jax import api, checkpoints, cli, model_folder, trainer
from hade_jax import export as hade_export
from hade_jax.convert import clap as convert_clap
from tests.tiny_train_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_MODULES = ("orbax", "tensorflow_datasets", "grain", "hade_jax.trainer",
                    "hade_jax.input_pipeline")


def waves(n=3, seconds=1.0, rate=16_000, seed=0):
  rng = np.random.default_rng(seed)
  return [(0.1 * rng.standard_normal(int(seconds * rate * (1 + i / 3)))).astype(np.float32)
          for i in range(n)]


TEXTS = ["a dog barks twice", "rain falls on a metal roof", "a car passes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data, minilm_dir) -> pathlib.Path:
  """A tiny HADE trained 4 steps: checkpoints/2 and checkpoints/4, and best/2.

  The run stops before its last step, so the trainer skips its evaluations (their compiles
  would double the fixture's time); step 2 is then made the best by the trainer's own
  manager, so that 'best' and 'latest' are different steps.
  """
  workdir = tmp_path_factory.mktemp("wd")
  config = tiny_config(tiny_data, minilm_dir, total_steps=5, max_steps_per_run=4,
                       final_eval_split="")
  trainer.train_and_evaluate(config, workdir)
  step_dir = workdir / "checkpoints" / "2"
  ckpt = checkpoints.Checkpoints(workdir, keep=3, best_metric=config.best_metric)
  assert ckpt.save_best(2, checkpoints.read_state(step_dir), checkpoints.saved_config(step_dir),
                        {config.best_metric: 1.0})
  ckpt.close()
  return workdir


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> tuple[api.Hade, pathlib.Path]:
  """(the model loaded from the run's best checkpoint, the model folder it saved)."""
  hade = api.Hade.load(trained)
  return hade, hade.save(tmp_path_factory.mktemp("export") / "model")


def test_export_save_load_gives_identical_embeddings_and_scores(saved):
  hade, folder = saved
  assert hade.kind == api.CHECKPOINT_KIND
  assert sorted(p.name for p in folder.iterdir()) == [
      "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
      "tokenizer_config.json", "vocab.txt"]
  loaded = api.Hade.load(folder)
  assert loaded.kind == model_folder.KIND and loaded.checkpoint == str(folder)
  assert loaded.fingerprint() == hade.fingerprint()
  assert loaded.settings() == hade.settings()
  assert (loaded.tokenizer.max_len, loaded.batch_size) == (hade.tokenizer.max_len,
                                                           hade.batch_size)
  a0, a1 = hade.embed_audio(waves(), sample_rate=16_000), loaded.embed_audio(
      waves(), sample_rate=16_000)
  t0, t1 = hade.embed_text(TEXTS), loaded.embed_text(TEXTS)
  np.testing.assert_array_equal(a1.global_AxD, a0.global_AxD)
  np.testing.assert_array_equal(t1.global_TxD, t0.global_TxD)
  np.testing.assert_array_equal(loaded.score(a1, t1), hade.score(a0, t0))

  # Weights only: every variable of the model under its flat name, nothing else.
  from safetensors import numpy as safetensors_numpy

  tensors = safetensors_numpy.load_file(str(folder / "model.safetensors"))
  assert tensors.keys() == model_folder.flat_weights(hade.model).keys()
  assert "audio_encoder.batch_norm.mean" in tensors
  record = json.loads((folder / "config.json").read_text())
  assert record["source"] == {"kind": api.CHECKPOINT_KIND, "path": hade.checkpoint,
                              "step": int(pathlib.Path(hade.checkpoint).name)}
  assert "data_dir" not in record["config"]["data"] and "optim" not in record["config"]


def test_export_damaged_safetensors_is_refused(saved, tmp_path):
  _, folder = saved
  copy = tmp_path / "copy"
  copy.mkdir()
  for f in folder.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  weights = copy / "model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-5] ^= 0x10  # one bit of the last float: the file still parses
  weights.write_bytes(bytes(data))
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    api.Hade.load(copy)
  assert str(weights) in str(e.value) and "export the model again" in str(e.value)
  weights.unlink()
  with pytest.raises(checkpoints.CorruptCheckpointError, match="is missing"):
    api.Hade.load(copy)


def test_export_weights_that_do_not_fit_the_config_are_refused(saved, tmp_path):
  _, folder = saved
  copy = tmp_path / "copy"
  copy.mkdir()
  for f in folder.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  record = json.loads((copy / "config.json").read_text())
  record["config"]["model"]["heads"]["embed_dim"] = 8  # the weights were saved with 16
  (copy / "config.json").write_text(json.dumps(record))
  with pytest.raises(model_folder.FolderError) as e:
    api.Hade.load(copy)
  assert str(copy / "model.safetensors") in str(e.value)
  assert "heads.audio_projection.linear1.kernel: (64, 16), the config builds (64, 8)" in str(
      e.value)
  # A Hugging Face folder is not a model folder: the error lists what a path may be.
  (copy / "config.json").write_text(json.dumps({"model_type": "clap"}))
  with pytest.raises(FileNotFoundError, match="a model folder"):
    api.Hade.load(copy)


def test_export_folder_loads_without_orbax_tfds_or_grain(saved):
  _, folder = saved
  code = (f"import sys; from hade_jax import api; h = api.Hade.load({str(folder)!r}); "
          f"assert h.kind == 'model folder'; h.embed_text(['a dog']); "
          f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAINING_MODULES!r} "
          f"or m in {TRAINING_MODULES!r}))")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_export_command_which_best_latest_and_step(trained, tmp_path):
  sources = {}
  for which in ("best", "latest", "2"):
    result = hade_export.main([f"--workdir={trained}", f"--which={which}",
                               f"--out={tmp_path / which}"])
    record = json.loads((tmp_path / which / "config.json").read_text())
    sources[which] = record["source"]["path"]
    assert result["source"] == sources[which]
  assert sources == {"best": str(trained / "best" / "2"),
                     "latest": str(trained / "checkpoints" / "4"),
                     "2": str(trained / "checkpoints" / "2")}
  prints = {w: api.Hade.load(tmp_path / w).fingerprint() for w in ("best", "latest", "2")}
  assert prints["best"] == prints["2"] != prints["latest"]


def test_export_command_errors_without_traceback(trained, tmp_path, capsys):
  assert cli.run(hade_export.main, [f"--workdir={trained}", "--which=newest",
                                    f"--out={tmp_path / 'a'}"]) == 2
  assert "--which=newest" in capsys.readouterr().err
  assert cli.run(hade_export.main, [f"--workdir={trained}", "--which=3",
                                    f"--out={tmp_path / 'b'}"]) == 1
  err = capsys.readouterr().err
  assert "no step 3" in err and "[2, 4]" in err and "Traceback" not in err
  # The tiny model is not CLAP-shaped: every difference is named, nothing is written.
  out = tmp_path / "c"
  assert cli.run(hade_export.main, [f"--workdir={trained}", f"--out={out}",
                                    f"--clap_hf={tmp_path / 'hf'}"]) == 1
  err = capsys.readouterr().err
  for field in ("heads.projection='linear'", "heads.text_pool='mean'", "text.variant='bert'"):
    assert field in err
  assert not out.exists() and not (tmp_path / "hf").exists()
  assert cli.run(hade_export.main, [f"--workdir={trained}", f"--out={trained}"]) == 1
  assert "is not an empty folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Hugging Face ClapModel: import, export back, load with transformers.


def test_export_clap_round_trip_with_transformers(tmp_path):
  import torch
  from transformers import ClapConfig, ClapModel

  from tests import hf_reference
  from tests.test_clap_vs_reference import AUDIO, TEXT, inputs

  torch.manual_seed(0)
  ref = hf_reference.randomize_(
      ClapModel(ClapConfig(audio_config=AUDIO, text_config=TEXT, projection_dim=24)))
  ref.save_pretrained(tmp_path / "in")
  model, _ = convert_clap.load_clap(tmp_path / "in")
  out = convert_clap.export_clap(model, tmp_path / "out", crop_seconds=5.12, pad_mode="zeros")
  back, info = ClapModel.from_pretrained(out, output_loading_info=True)
  back.eval()
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys
  want = ref.state_dict()
  # HADE keeps one temperature, CLAP's text->audio one (logit_scale_t); both scales get it.
  want["logit_scale_a"] = want["logit_scale_t"]
  for key, value in back.state_dict().items():
    assert torch.equal(value, want[key]), key

  mel, ids, mask = inputs(seed=1)
  with torch.no_grad():
    def features(m):
      a = m.get_audio_features(input_features=torch.from_numpy(mel)[:, None])
      t = m.get_text_features(input_ids=torch.from_numpy(ids),
                              attention_mask=torch.from_numpy(mask))
      return (getattr(a, "pooler_output", a).numpy(), getattr(t, "pooler_output", t).numpy())

    (a_ref, t_ref), (a_back, t_back) = features(ref), features(back)
  np.testing.assert_allclose(a_back, a_ref, atol=1e-4, rtol=0)
  np.testing.assert_allclose(t_back, t_ref, atol=1e-4, rtol=0)
  # The front end's settings travel in preprocessor_config.json.
  pre = json.loads((out / "preprocessor_config.json").read_text())
  assert convert_clap.frontend.LogMelConfig.from_hf(pre) == model.cfg.mel
  assert (pre["max_length_s"], pre["padding"]) == (5.12, "pad")
