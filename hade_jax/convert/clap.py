"""Imports a LAION-CLAP checkpoint (HF `ClapModel`, non-fusion) into a `HadeModel`.

Both towers, both projection layers and the temperature come from the checkpoint:
  audio_model.audio_encoder.*   -> audio_encoder/*           (convert.htsat)
  text_model.*                  -> text_encoder/*            (convert.bert, RoBERTa layout)
  audio_projection.linear{1,2}  -> heads/audio_projection/linear{1,2}
  text_projection.linear{1,2}   -> heads/text_projection/linear{1,2}
  logit_scale_t                 -> heads/logit_scale   (CLAP scales text->audio logits by it)
HADE's new heads (THA levels, DCR, CA) have no counterpart and keep their initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import bert, frontend, hade, htsat
from hade_jax import heads as hade_heads
from hade_jax.convert import bert as convert_bert
from hade_jax.convert import common
from hade_jax.convert import htsat as convert_htsat


def config_from_clap(clap_config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                     **heads_overrides) -> hade.HadeConfig:
  """A HadeConfig whose towers and projections match a ClapModel `config.json`.

  The text tower pools with CLAP's pooler; the joint width is CLAP's `projection_dim`.
  `heads_overrides` set the HADE heads (levels, factors, ...); the default levels are mapped
  onto the checkpoint's depth (audio stages 2/3/4 with text blocks at 1/3, 2/3, 3/3 depth).
  """
  audio = htsat.HtsatConfig.from_hf(clap_config)
  text = bert.BertConfig.from_hf(clap_config.get("text_config", clap_config))
  num_blocks = text.num_hidden_layers
  levels = tuple((h, max(1, round(num_blocks * f))) for h, f in ((2, 1 / 3), (3, 2 / 3), (4, 1.0)))
  head_kwargs = dict(embed_dim=int(clap_config.get("projection_dim", 512)), projection="clap",
                     text_pool="pooler", levels=levels)
  heads_cfg = hade_heads.HeadsConfig(**(head_kwargs | heads_overrides))
  if preprocessor is not None:
    mel = frontend.LogMelConfig.from_hf(preprocessor.get("feature_extractor", preprocessor))
  else:
    mel = dataclasses.replace(frontend.LogMelConfig.laion_clap(), n_mels=audio.num_mel_bins)
  return hade.HadeConfig(audio=audio, text=text, heads=heads_cfg, mel=mel)


def import_clap(model: hade.HadeModel, source: str | pathlib.Path | Mapping[str, np.ndarray]
                ) -> common.ImportReport:
  """Copies a ClapModel checkpoint (a local folder or a state dict) into `model` in place."""
  if isinstance(source, Mapping):
    state_dict, name = source, "state dict"
  else:
    _, state_dict = common.load_hf_folder(source)
    name = str(source)
  reports = [
      convert_htsat.import_htsat(model.audio_encoder, state_dict,
                                 prefix="audio_model.audio_encoder.", source=name),
      convert_bert.import_bert(model.text_encoder, state_dict, prefix="text_model."),
  ]
  for side in ("audio", "text"):
    module = getattr(model.heads, f"{side}_projection")
    if module.kind != "clap":
      raise common.ConversionError(f"{name}: CLAP projections are Linear-ReLU-Linear; the model "
                                   f"was built with heads.projection={module.kind!r}")
    reports.append(common.import_params(
        module, state_dict, source=name,
        name_fn=lambda path, side=side: f"{side}_projection." + common.default_hf_name(path)))
  if "logit_scale_t" not in state_dict:
    raise common.ConversionError(f"{name} has no logit_scale_t")
  model.heads.logit_scale[...] = jnp.asarray(np.asarray(state_dict["logit_scale_t"]),
                                             jnp.float32).reshape(())

  total = common.ImportReport(source=name)
  for r in reports:
    total.loaded += r.loaded
    total.missing += r.missing
    total.expected_unused += r.expected_unused
  total.loaded.append("logit_scale_t")
  consumed = set(total.loaded) | set(total.expected_unused)
  expected = {"logit_scale_a"}  # CLAP's audio->text scale; HADE has one shared temperature
  total.unused = sorted(k for k in state_dict if k not in consumed and k not in expected)
  total.expected_unused += sorted(expected & set(state_dict))
  return total


def load_clap(folder: str | pathlib.Path, *, seed: int = 0, **heads_overrides
              ) -> tuple[hade.HadeModel, common.ImportReport]:
  """Builds a HadeModel shaped like a local ClapModel folder and imports its weights."""
  folder = pathlib.Path(folder).expanduser()
  config, state_dict = common.load_hf_folder(folder)
  pre_path = folder / "preprocessor_config.json"
  pre = json.loads(pre_path.read_text(encoding="utf-8")) if pre_path.is_file() else None
  cfg = config_from_clap(config, pre, **heads_overrides)
  model = hade.HadeModel(cfg, rngs=nnx.Rngs(seed))
  report = import_clap(model, state_dict)
  report.source = str(folder)
  return model, report
