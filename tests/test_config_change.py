"""A config changed on an existing workdir is named, not reported as damaged checkpoints
(hade_jax/config_change.py): model changes are refused, seed/optimizer changes refused unless
allowed (then logged), other changes logged."""

import logging

import pytest

from hade_jax import config_change, trainer, validation
from tests.tiny_train_config import tiny_config


def test_config_change_differences_are_sorted_by_kind():
  saved = {"seed": 0, "model": {"heads": {"embed_dim": 16, "levels": [[2, 1]]}},
           "optim": {"lr": {"all": 1e-3}, "frozen": []}, "eval_every_steps": 0,
           "batch_size": 8, "total_steps_resolved": 4}
  requested = {"seed": 1, "model": {"heads": {"embed_dim": 32, "levels": ((2, 1),)}},
               "optim": {"lr": {"all": 1e-3}, "frozen": ("backbone",)}, "eval_every_steps": 5,
               "batch_size": 16, "new_key": True}
  diff = config_change.differences(saved, requested)
  assert diff == {
      "structure": [("model.heads.embed_dim", 16, 32), ("optim.frozen", [], ["backbone"])],
      "training": [("seed", 0, 1)],
      "other": [("eval_every_steps", 0, 5), ("new_key", "<absent>", True)]}


@pytest.fixture(scope="module")
def trained(tiny_data, minilm_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("config_change")
  overrides = dict(total_steps=2, checkpoint_every_steps=2, final_eval_split="",
                   best_metric="", eval_every_steps=0)
  trainer.train_and_evaluate(tiny_config(tiny_data, minilm_dir, **overrides), workdir)
  return workdir, overrides


def _steps(workdir):
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_config_change_ignores_a_new_field_at_its_default():
  # A checkpoint saved before a field existed (e.g. loss.global_nce_weight) resumes when the
  # field keeps its default, and not silently when it does not.
  saved = {"loss": {"alpha": 0.005}, "model": {"heads": {"embed_dim": 16}}}
  same = {"loss": {"alpha": 0.005, "global_nce_weight": 0.0},
          "model": {"heads": {"embed_dim": 16, "level_sim": "tokens"}}}
  assert config_change.differences(saved, same) == {"structure": [], "training": [],
                                                     "other": []}
  changed = {"loss": {"alpha": 0.005, "global_nce_weight": 0.5},
             "model": {"heads": {"embed_dim": 16, "level_sim": "attention"}}}
  diff = config_change.differences(saved, changed)
  assert diff["training"] == [("loss.global_nce_weight", "<absent>", 0.5)]
  assert diff["structure"] == [("model.heads.level_sim", "<absent>", "attention")]


def test_config_change_of_the_model_is_refused_naming_the_fields(trained, tiny_data,
                                                                 minilm_dir):
  workdir, overrides = trained
  config = tiny_config(tiny_data, minilm_dir, **overrides)
  config.model.heads.embed_dim = 8
  config.model.text.intermediate_size = 64
  with pytest.raises(config_change.ConfigChangeError) as e:
    trainer.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "model.heads.embed_dim: 16 -> 8" in message
  assert "model.text.intermediate_size: 32 -> 64" in message
  assert "checkpoints are fine and were not touched" in message
  assert "unreadable" not in message
  assert isinstance(e.value, validation.ConfigError)
  assert _steps(workdir) == ["2"]  # nothing set aside as damaged


def test_config_change_of_seed_or_optimizer_needs_the_flag(trained, tiny_data, minilm_dir,
                                                           caplog):
  workdir, overrides = trained
  changed = dict(overrides, seed=7, **{"optim.clip_norm": 1.0})
  with pytest.raises(config_change.ConfigChangeError,
                     match=r"(?s)optim\.clip_norm: 2\.0 -> 1\.0\n  seed: 0 -> 7.*"
                           r"allow_config_change=True"):
    trainer.train_and_evaluate(tiny_config(tiny_data, minilm_dir, **changed), workdir)
  assert _steps(workdir) == ["2"]
  # Allowed: the run goes on (one more step), the changes logged; a longer run and another
  # log cadence are only logged.
  caplog.set_level(logging.INFO)
  allowed = dict(changed, allow_config_change=True, total_steps=3, log_every_steps=3)
  trainer.train_and_evaluate(tiny_config(tiny_data, minilm_dir, **allowed), workdir)
  assert "with training changes (allow_config_change=True):\n  optim.clip_norm" in caplog.text
  assert "log_every_steps: 1 -> 3" in caplog.text and "total_steps: 2 -> 3" in caplog.text
  assert _steps(workdir)[-1] == "3"
  assert f"results in {workdir}: metrics.jsonl" in caplog.text
