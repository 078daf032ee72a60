"""Every config file loads, locks, and describes a model that can be built."""

import importlib
import pathlib

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from hade_jax import hade

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def load(path: pathlib.Path, arg: str = ""):
  """Loads a config file exactly as `--config=PATH[:ARG]` would (locked)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  fv([__file__, f"--config={path}" + (f":{arg}" if arg else "")])
  return fv.config


def test_all_config_files_are_covered():
  assert {p.name for p in CONFIG_FILES} == {"base.py", "clotho.py", "audiocaps.py", "demo.py",
                                            "esc50.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("ablation", ["", "ablation=global", "ablation=tha", "ablation=dcr"])
def test_config_loads_and_builds_a_model(path, ablation):
  config = load(path, ablation)
  cfg = hade.model_config(config)
  switches = {"ablation=global": (False, False), "ablation=tha": (True, False),
              "ablation=dcr": (False, True), "ablation=full": (True, True),
              "ablation=full_attention": (True, True)}
  # A config file's default variant: its DEFAULT_ABLATION (esc50.py: chosen on validation).
  default = getattr(importlib.import_module(f"configs.{path.stem}"), "DEFAULT_ABLATION", "full")
  expected = switches[ablation or f"ablation={default}"]
  assert (cfg.heads.use_tha, cfg.heads.use_dcr) == expected
  assert (cfg.heads.level_sim == "attention") == (ablation == "ablation=full_attention")
  model = nnx.eval_shape(lambda: hade.HadeModel(cfg, rngs=nnx.Rngs(0)))
  assert model.heads.cfg == cfg.heads
  # The optimizer groups cover every parameter.
  from hade_jax import optim
  _, params, _ = hade.split_model(model)
  optim.group_labels(params, config.optim.groups)


def test_attention_ablations_build_a_model():
  for arg in ("ablation=full_attention", "ablation=tha_attention"):
    config = load(ROOT / "configs" / "demo.py", arg)
    cfg = hade.model_config(config)
    assert cfg.heads.level_sim == "attention" and cfg.heads.use_tha
    assert cfg.heads.use_dcr == (arg == "ablation=full_attention")
    model = nnx.eval_shape(lambda cfg=cfg: hade.HadeModel(cfg, rngs=nnx.Rngs(0)))
    assert [level.attention_scale.shape for level in model.heads.tha] == [()] * 3


def test_locked_config_rejects_a_misspelt_key():
  config = load(ROOT / "configs" / "clotho.py")
  with pytest.raises(AttributeError):
    config.data.datset = "clotho"
  with pytest.raises(flags.Error, match="unknown ablation"):
    load(ROOT / "configs" / "clotho.py", "ablation=everything")

