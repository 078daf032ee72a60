"""validate_config: shipped configs are clean; every bad field is named, all at once, early."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from hade_jax import metrics, sharding, trainer, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8  # conftest: --xla_force_host_platform_device_count=8


def load(path: pathlib.Path | str, arg: str = "", *overrides: str):
  """A config file as `--config=PATH[:ARG] --config.key=value ...` gives it (locked)."""
  argv = [__file__, f"--config={path}" + (f":{arg}" if arg else ""), *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


SHIPPED = [(f"configs/{name}.py", arg) for name in ("base", "clotho", "audiocaps", "demo")
           for arg in ("", "ablation=global", "ablation=tha", "ablation=dcr", "ablation=full")]
SHIPPED.append(("configs/demo.py", "ablation=full_attention"))
SHIPPED.append(("tests/tiny_train_config.py", ""))


@pytest.mark.parametrize("path,arg", SHIPPED, ids=[f"{p}:{a}" for p, a in SHIPPED])
@pytest.mark.parametrize("devices,processes", [(8, 1), (8, 2), (1, 1)])
def test_shipped_configs_are_clean(path, arg, devices, processes):
  config = load(ROOT / path, arg)
  validation.validate_config(config, num_devices=devices, num_processes=processes)


def test_defaults_are_jax_device_and_process_counts():
  assert jax.device_count() == DEVICES
  validation.validate_config(load(ROOT / "configs/demo.py"))
  with pytest.raises(validation.ConfigError, match=r"config\.batch_size: 36 does not divide "
                     r"over the 8 devices"):
    validation.validate_config(load(ROOT / "configs/demo.py", "", "--config.batch_size=36"))


def _saved(config, **extra) -> ml_collections.ConfigDict:
  """The config as a checkpoint saves it (JSON: tuples become lists) and api loads it."""
  return ml_collections.ConfigDict(json.loads(json.dumps(dict(config.to_dict(), **extra))))


@pytest.mark.parametrize("name", ["clotho", "demo"])
def test_a_config_saved_as_json_is_clean(name):
  saved = _saved(load(ROOT / f"configs/{name}.py"), total_steps_resolved=100)
  validation.validate_config(saved, num_devices=8, num_processes=1)
  validation.validate_config(saved, training=False)
  # An older checkpoint's config may lack keys added to the schema since, or hold keys
  # removed since: fine for eval, not for training.
  del saved["log_batch_ids"]
  saved.data.old_option = 1
  validation.validate_config(saved, training=False)
  with pytest.raises(validation.ConfigError, match=r"config\.log_batch_ids: missing"):
    validation.validate_config(saved, num_devices=8, num_processes=1)


def _set(d: dict, path: str, value) -> None:
  *parents, leaf = path.split(".")
  for p in parents:
    d = d[p]
  if value is _DELETE:
    del d[leaf]
  else:
    d[leaf] = value


class _Delete:
  """The value that removes a key (its repr is stable: test ids must be the same in every
  pytest-xdist worker)."""

  def __repr__(self) -> str:
    return "<deleted>"


_DELETE = _Delete()

# (overrides on configs/demo.py as a plain dict, a field the message must name, a phrase).
# Built from a dict, as a saved config or a config written in code would be, so that
# ml_collections' own type checks on assignment do not come first.
BAD = [
    ({"batch_size": "64"}, "config.batch_size", "expected int"),
    ({"batch_size": 64.5}, "config.batch_size", "expected int"),
    ({"batch_size": True}, "config.batch_size", "expected int"),
    ({"batch_size": 0}, "config.batch_size", "must be > 0"),
    ({"batch_size": 7}, "config.batch_size", "does not divide over the 8 devices"),
    ({"batch_size": None}, "config.batch_size", "is None"),
    ({"optim.lr.audio": -1e-3}, "config.optim.lr.audio", "must be >= 0"),
    ({"optim.lr.audio": "1e-3"}, "config.optim.lr.audio", "expected a finite number"),
    ({"optim.lr.audio": float("nan")}, "config.optim.lr.audio", "expected a finite number"),
    ({"optim.weight_decay.heads": -0.1}, "config.optim.weight_decay.heads", "must be >= 0"),
    ({"optim.lr.backbone": 1e-4}, "config.optim.lr.backbone", "unknown group"),
    ({"optim.weight_decay.decoder": 0.1}, "config.optim.weight_decay.decoder", "unknown group"),
    ({"optim.frozen": ("txt",)}, "config.optim.frozen", "'txt' is not a group"),
    ({"optim.lr": {"audio": 1e-3, "heads": 1e-3}, "optim.frozen": ()}, "config.optim.lr",
     "no learning rate for group 'text'"),
    ({"optim.groups": (("^text_encoder/(", "text"), (".*", "heads"))}, "config.optim.groups[0]",
     "invalid regex"),
    ({"optim.groups": (("^text_encoder/",),)}, "config.optim.groups[0]", "pair"),
    ({"optim.b2": 1.0}, "config.optim.b2", "[0, 1)"),
    ({"optim.eps": 0.0}, "config.optim.eps", "> 0"),
    ({"optim.warmup_epochs": -1.0}, "config.optim.warmup_epochs", ">= 0"),
    ({"num_epochs": 0.0, "total_steps": 0}, "config.num_epochs", "no training length"),
    ({"num_epochs": -2.0, "total_steps": -1}, "config.num_epochs", "no training length"),
    ({"num_epochs": float("inf")}, "config.num_epochs", "finite"),
    ({"num_epochs": "16"}, "config.num_epochs", "expected float"),
    ({"compute_dtype": "float64"}, "config.compute_dtype", "not one of float32"),
    ({"model.audio.dtype": "int8"}, "config.model.audio.dtype", "not one of"),
    ({"model.heads.use_tha": 1}, "config.model.heads.use_tha", "expected bool"),
    ({"model.heads.use_dcr": "yes"}, "config.model.heads.use_dcr", "expected bool"),
    ({"model.heads.levels": ((9, 1),)}, "config.model", "audio stage 9"),
    ({"model.heads.use_global": False, "model.heads.use_tha": False,
      "model.heads.use_dcr": False}, "config.model", "at least one of"),
    ({"data.dataset": "clothoo"}, "config.data.dataset", "'clothoo' is not one of"),
    ({"data.pad_mode": "reflect"}, "config.data.pad_mode", "not one of"),
    ({"data.eval_crop": "middle"}, "config.data.eval_crop", "not one of"),
    ({"data.crop_seconds": 0.0}, "config.data.crop_seconds", "> 0"),
    ({"data.crop_seconds": -1}, "config.data.crop_seconds", "> 0"),
    ({"data.max_text_len": 2}, "config.data.max_text_len", ">= 3"),
    ({"data.max_text_len": 600}, "config.data.max_text_len", "512 positions"),
    ({"data.synth_size": "huge"}, "config.data.synth_size", "not one of"),
    ({"data.builder_config": "48k"}, "config.model.mel.sample_rate",
     "stores audio at 48000 Hz"),
    ({"data.builder_config": "loud"}, "config.data.builder_config", "names no sample rate"),
    ({"data.eval_split": ""}, "config.data.eval_split", "is empty"),
    ({"data.num_threads": 0}, "config.data.num_threads", "> 0"),
    ({"mesh": (("data", 3), ("fsdp", 1))}, "config.mesh", "does not divide the 8"),
    ({"mesh": (("data", -1), ("fsdp", -1))}, "config.mesh", "at most one axis"),
    ({"mesh": (("data", 0),)}, "config.mesh", "not a positive integer or -1"),
    ({"mesh": (("data", -1), ("data", 1))}, "config.mesh", "repeat"),
    ({"mesh": "data"}, "config.mesh", "expected"),
    ({"mesh": (("data", 2), ("fsdp", 4)), "batch_size": 36}, "config.batch_size",
     "data x fsdp"),
    ({"sharding_rules": (("[", "fsdp"),)}, "config.sharding_rules[0]", "invalid regex"),
    ({"sharding_rules": ((".*", ("tensor", None)),)}, "config.sharding_rules[0]",
     "['tensor']"),
    ({"sharding_rules": ((".*", "shard"),)}, "config.sharding_rules[0]", "spec 'shard'"),
    ({"checkpoint_every_steps": 0}, "config.checkpoint_every_steps", "> 0"),
    ({"log_every_steps": 0}, "config.log_every_steps", "> 0"),
    ({"eval_every_steps": -5}, "config.eval_every_steps", ">= 0"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints", ">= 1"),
    ({"skip_nonfinite_steps": 1}, "config.skip_nonfinite_steps", "expected bool"),
    ({"max_consecutive_skips": -1}, "config.max_consecutive_skips", ">= 0"),
    ({"eval_batch_size": 0}, "config.eval_batch_size", "> 0"),
    ({"eval_tile": -1}, "config.eval_tile", "> 0"),
    ({"eval_shortlists": (50, 0)}, "config.eval_shortlists", "sizes >= 1"),
    ({"model.heads.level_sim": "cross"}, "config.model.heads.level_sim", "'attention'"),
    ({"best_metric": "val/t2a/median_rank"}, "config.best_metric", "not a validation metric"),
    ({"best_metric": "val/R@1"}, "config.best_metric", "val/t2a/R@1+R@5+R@10"),
    ({"batch_sz": 32}, "config.batch_sz", "unknown key"),
    ({"data.tokenizer": "x"}, "config.data.tokenizer", "unknown key"),
    ({"seed": _DELETE}, "config.seed", "missing"),
    ({"data": 3}, "config.data", "expected a ConfigDict"),
]


def _bad_config(overrides: dict) -> ml_collections.ConfigDict:
  d = load(ROOT / "configs/demo.py").to_dict()
  for path, value in overrides.items():
    _set(d, path, value)
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("overrides,field,phrase", BAD, ids=[str(b[0])[:60] for b in BAD])
def test_bad_field_is_named(overrides, field, phrase):
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(_bad_config(overrides), num_devices=DEVICES, num_processes=1)
  assert isinstance(e.value, ValueError)
  lines = [p for p in e.value.problems if p.startswith(f"{field}:")]
  assert lines, f"no problem names {field}: {e.value.problems}"
  assert any(phrase in p for p in lines), lines
  assert f"  {lines[0]}" in str(e.value)


def test_every_problem_is_listed_at_once():
  overrides = {"batch_size": 7, "optim.lr.audio": -1.0, "data.pad_mode": "reflect",
               "keep_checkpoints": 0, "best_metric": "val/R@1"}
  with pytest.raises(validation.ConfigError, match=r"invalid config \(5 problems\)") as e:
    validation.validate_config(_bad_config(overrides), num_devices=DEVICES, num_processes=1)
  fields = sorted(p.split(":")[0] for p in e.value.problems)
  assert fields == ["config.batch_size", "config.best_metric", "config.data.pad_mode",
                    "config.keep_checkpoints", "config.optim.lr.audio"]


def test_batch_must_divide_over_processes():
  config = load(ROOT / "configs/demo.py")  # batch 32
  validation.validate_config(config, num_devices=8, num_processes=4)
  with pytest.raises(validation.ConfigError, match=r"config\.batch_size: 32 does not divide "
                     r"over 3 processes"):
    validation.validate_config(config, num_devices=6, num_processes=3)


def test_eval_mode_skips_training_only_checks():
  config = _bad_config({"batch_size": 7, "keep_checkpoints": 0, "optim.lr.audio": -1.0,
                        "mesh": (("data", 3),)})
  validation.validate_config(config, training=False)  # evaluation pads to any device count
  with pytest.raises(validation.ConfigError, match=r"config\.data\.max_text_len"):
    validation.validate_config(_bad_config({"data.max_text_len": 1}), training=False)


def test_command_line_type_errors_already_fail_in_ml_collections():
  # What the flag parser enforces by itself (validate_config covers the rest).
  for override in ("--config.batch_size=64.5", "--config.batch_size=x",
                   "--config.optim.lr.audio=fast", "--config.model.heads.use_tha=2"):
    with pytest.raises(flags.IllegalFlagValueError):
      load(ROOT / "configs/demo.py", "", override)
  # ...but not values of the right type.
  config = load(ROOT / "configs/demo.py", "", "--config.optim.lr.audio=-1",
                "--config.compute_dtype=float64", "--config.data.pad_mode=reflect")
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(config)
  assert len(e.value.problems) == 3


@pytest.mark.parametrize("axes", [
    (("data", -1), ("fsdp", 1)), (("data", -1), ("fsdp", 2)), (("data", 2), ("fsdp", -1)),
    (("data", 4),), (("data", 2), ("fsdp", 2)), (("data", 8), ("fsdp", 1)), (("fsdp", -1),),
    (("data", 3),), (("data", -1), ("fsdp", 3)), (("data", 16),), (("data", -1), ("x", -1)),
    (("data", 0), ("fsdp", -1)), (("data", -1), ("fsdp", 8)),
])
def test_mesh_shape_agrees_with_make_mesh(axes):
  try:
    expected = dict(sharding.make_mesh(axes).shape)
  except ValueError:
    expected = None
  try:
    got = sharding.mesh_shape(axes, DEVICES)
  except ValueError:
    got = None
  assert got == expected


def test_data_facts_have_one_owner():
  from data_pipelines import builders, policy
  from hade_jax import input_pipeline

  assert builders.RATES is policy.RATES
  assert builders._SYNTH_SIZES is policy.SYNTH_SIZES  # noqa: SLF001
  for pad_mode in policy.PAD_MODES:  # every mode the config may name, the pipeline accepts
    for eval_crop in policy.EVAL_CROPS:
      input_pipeline.InputConfig(data_dir="", dataset="clotho", config="16k",
                                 sample_rate=16_000, tokenizer_path="", crop_seconds=1.0,
                                 max_text_len=8, pad_mode=pad_mode, eval_crop=eval_crop)
  assert policy.builder_rate("48k_v2") == 48_000
  assert policy.builder_rate("demo_16k") == 16_000
  assert policy.builder_rate("custom1a2b3c4d_8000hz") == 8_000
  assert policy.builder_rate(policy.rate_name(8_000)) == 8_000


def test_the_library_never_imports_configs():
  root = ROOT / "hade_jax"
  for path in [*root.rglob("*.py"), *(ROOT / "data_pipelines").rglob("*.py")]:
    text = path.read_text()
    assert "from configs" not in text and "import configs" not in text, path


def test_best_metric_names_are_what_the_trainer_logs():
  rng = np.random.default_rng(0)
  m = metrics.retrieval_metrics(rng.standard_normal((4, 8)), np.repeat(np.arange(4), 2))
  logged = {f"val/{k}" for k in m} | set(trainer.rsum(m, "val"))
  assert set(validation.best_metric_names()) <= logged
  assert "val/t2a/R@1+R@5+R@10" in validation.best_metric_names()


def test_trainer_validates_before_building_anything(tmp_path, monkeypatch):
  """Needs `validation.validate_config(config)` as the first line of train_and_evaluate."""
  from tests import tiny_train_config

  def no_jit(*args, **kwargs):
    raise AssertionError("jax.jit called before the config was validated")

  monkeypatch.setattr(jax, "jit", no_jit)
  workdir = tmp_path / "workdir"
  config = tiny_train_config.tiny_config(data_dir=tmp_path / "no_data", batch_size=7)
  with pytest.raises(validation.ConfigError, match=r"config\.batch_size: 7 does not divide"):
    trainer.train_and_evaluate(config, workdir)
  assert not workdir.exists()


def test_train_command_fails_on_a_bad_batch_before_training(tmp_path):
  workdir = tmp_path / "workdir"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "hade_jax.train", "--config=configs/demo.py",
       "--config.batch_size=7", f"--config.data.data_dir={tmp_path / 'tfds'}",
       f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config.batch_size" in result.stderr and "does not divide" in result.stderr
  assert not (workdir / "checkpoints").exists()
  assert not (tmp_path / "tfds").exists()  # the demo's auto-prepare never started


# Issue 13 item 9: sizes that would allocate until memory runs out, or crash in arithmetic,
# are refused by the config dataclasses with one ConfigError naming the field.
BAD_SIZES = [
    ({"model.text.num_hidden_layers": 1_000_000}, "config.model.text.num_hidden_layers",
     "must be <= 1000"),
    ({"model.text.num_hidden_layers": 900, "model.text.hidden_size": 8192,
      "model.text.num_attention_heads": 8}, "config.model", "num_hidden_layers=900"),
    ({"model.text.hidden_size": 1.2e9}, "config.model.text.hidden_size", "expected int"),
    ({"model.text.hidden_size": 1_200_000_000}, "config.model", "hidden_size=1200000000"),
    ({"model.text.vocab_size": 10**12}, "config.model", "vocab_size=1000000000000"),
    ({"model.heads.embed_dim": 10**9}, "config.model", "embed_dim=1000000000"),
    ({"batch_size": 10**9}, "config.batch_size", "of activations per device"),
    ({"model.heads.num_factors": 0}, "config.model.heads.num_factors", "must be >= 1"),
    ({"model.text.num_hidden_layers": -3}, "config.model.text.num_hidden_layers",
     "must be >= 1"),
    ({"model.text.hidden_size": "384"}, "config.model.text.hidden_size", "got str '384'"),
    ({"model.audio.depths": (1, 1, 10**6, 1)}, "config.model.audio.depths", "<= 1000"),
    ({"model.mel.n_mels": "64"}, "config.model.mel.n_mels", "expected int"),
]


@pytest.mark.parametrize("overrides,field,phrase", BAD_SIZES,
                         ids=[str(b[0])[:60] for b in BAD_SIZES])
def test_config_sizes_are_refused_before_allocation(overrides, field, phrase):
  with pytest.raises(validation.ConfigError) as e:
    validation.validate_config(_bad_config(overrides), num_devices=DEVICES, num_processes=1)
  lines = [p for p in e.value.problems if p.startswith(f"{field}:")]
  assert lines and any(phrase in p for p in lines), e.value.problems


def test_config_sizes_state_the_estimate():
  with pytest.raises(validation.ConfigError, match=r"about 931 GiB of float32 parameters "
                     r"\(2\.5e\+11\) exceed the 64 GiB cap"):
    validation.validate_config(_bad_config({"model.text.vocab_size": 10**12 // 1536}),
                               training=False)


@pytest.mark.parametrize("field,value,phrase", [
    ("num_hidden_layers", 1_000_000, "num_hidden_layers: must be <= 1000"),
    ("num_hidden_layers", 100_000_000 // 1000, "num_hidden_layers: must be <= 1000"),
    ("hidden_size", 1.2e9, "hidden_size: expected int"),
    ("vocab_size", 10**12, "vocab_size=1000000000000"),
    ("num_hidden_layers", -3, "num_hidden_layers: must be >= 1"),
    ("hidden_size", "384", "hidden_size: expected int"),
])
def test_imported_config_json_sizes_are_refused(tmp_path, field, value, phrase):
  """`config.json` of an HF folder: refused before the weights or the model are allocated."""
  from hade_jax import bert, fields
  from hade_jax.convert import bert as convert_bert
  from hade_jax.convert import common

  hf = {"model_type": "bert", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 37, "max_position_embeddings": 64,
        field: value}
  with pytest.raises(fields.ConfigError, match=re.escape(phrase)):
    bert.BertConfig.from_hf(hf)
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(hf))
  from safetensors import numpy as safetensors_numpy
  safetensors_numpy.save_file({"embeddings.word_embeddings.weight": np.zeros((99, 32),
                                                                             np.float32)},
                              str(folder / "model.safetensors"))
  with pytest.raises(common.ConversionError, match=re.escape(phrase)) as e:
    convert_bert.load_text_tower(folder)
  assert "config.json" in str(e.value)


@pytest.mark.parametrize("cls_name,hf,phrase", [
    ("HtsatConfig", {"patch_embeds_hidden_size": 10**6, "num_attention_heads": [1, 1, 1, 1]},
     "patch_embeds_hidden_size=1000000"),
    ("HtsatConfig", {"depths": [2, -2, 6, 2]}, "depths: expected positive integers"),
    ("HtsatConfig", {"spec_size": "256"}, "spec_size: expected int"),
    ("LogMelConfig", {"feature_size": 10**9, "fft_window_size": 10**6},
     "float32 parameters"),
    ("LogMelConfig", {"hop_length": 0}, "hop_length: must be >= 1"),
    ("LogMelConfig", {"feature_size": "64"}, "n_mels: expected int"),
])
def test_imported_audio_config_sizes_are_refused(cls_name, hf, phrase):
  from hade_jax import fields, frontend, htsat

  cls = {"HtsatConfig": htsat.HtsatConfig, "LogMelConfig": frontend.LogMelConfig}[cls_name]
  with pytest.raises(fields.ConfigError, match=re.escape(phrase)):
    cls.from_hf(hf)


def test_config_json_that_is_not_an_object_names_the_file(tmp_path):
  from hade_jax.convert import common

  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(common.ConversionError, match="config.json holds a JSON list"):
    common.load_hf_folder(tmp_path)
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(common.ConversionError, match="config.json is not valid JSON"):
    common.load_hf_folder(tmp_path)


def test_saved_config_with_retired_mel_keys_still_loads():
  """Workdirs saved before #12 hold model.mel.max_length_s / padding: accepted, dropped."""
  saved = _saved(load(ROOT / "configs/demo.py"), total_steps_resolved=100)
  saved.model.mel.max_length_s = 10.0
  saved.model.mel.padding = "repeatpad"
  for training in (True, False):
    sections = validation.validate_config(saved, num_devices=8, num_processes=1,
                                          training=training)
    assert sections.model.mel.sample_rate == 16_000
  from hade_jax import hade
  assert hade.HadeConfig.from_config(saved.model.to_dict()).mel == sections.model.mel
