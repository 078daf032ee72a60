"""Imports a LAION-CLAP checkpoint (HF `ClapModel`, non-fusion) into a `HadeModel`.

Both towers, both projection layers and the temperature come from the checkpoint:
  audio_model.audio_encoder.*   -> audio_encoder/*           (convert.htsat)
  text_model.*                  -> text_encoder/*            (convert.bert, RoBERTa layout)
  audio_projection.linear{1,2}  -> heads/audio_projection/linear{1,2}
  text_projection.linear{1,2}   -> heads/text_projection/linear{1,2}
  logit_scale_t                 -> heads/logit_scale   (CLAP scales text->audio logits by it)
HADE's new heads (THA levels, DCR, CA) have no counterpart and keep their initialisation.

`export_clap` is the reverse, with the same table: a CLAP-shaped HadeModel (`clap_shape_problems`
lists what is not) -> a ClapModel folder that transformers loads; the THA/DCR heads stay behind.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
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


# ---------------------------------------------------------------------------------------------
# Export: the reverse of `import_clap`, with the same rename table.


class NotClapShapedError(common.ConversionError):
  """A model whose towers, projections or front end a `ClapModel` cannot hold."""


# The front end a ClapFeatureExtractor computes (non-fusion): LogMelConfig fields -> values.
_CLAP_FRONT_END = {"mel_scale": "slaney", "mel_norm": "slaney", "center": True,
                   "pad_mode": "reflect", "mel_floor": 1e-10, "amin": 1e-10, "ref": 1.0,
                   "top_db": None}
# data_pipelines.policy pad modes -> ClapFeatureExtractor `padding` (any other value: zeros).
_HF_PADDING = {"zeros": "pad", "repeat": "repeat", "repeatpad": "repeatpad"}


def clap_shape_problems(cfg: hade.HadeConfig) -> list[str]:
  """What keeps a HadeConfig from being a LAION-CLAP `ClapModel` (empty: nothing)."""
  problems = []
  if cfg.heads.projection != "clap":
    problems.append(f"heads.projection={cfg.heads.projection!r}: CLAP projects with "
                    "Linear-ReLU-Linear ('clap')")
  if cfg.heads.text_pool != "pooler":
    problems.append(f"heads.text_pool={cfg.heads.text_pool!r}: CLAP projects the text "
                    "tower's pooler output ('pooler')")
  if cfg.text.variant != "roberta":
    problems.append(f"text.variant={cfg.text.variant!r}: CLAP's text tower is RoBERTa-shaped "
                    "(positions counted from pad_token_id)")
  if not cfg.text.add_pooler:
    problems.append("text.add_pooler=False: CLAP's text tower has a pooler")
  for name, want in _CLAP_FRONT_END.items():
    got = getattr(cfg.mel, name)
    if got != want:
      problems.append(f"mel.{name}={got!r}: ClapFeatureExtractor computes {want!r}")
  return problems


def clap_config(cfg: hade.HadeConfig) -> dict:
  """The `config.json` of a `ClapModel` with `cfg`'s towers and projections."""
  audio = {f.name: getattr(cfg.audio, f.name) for f in dataclasses.fields(cfg.audio)
           if f.name != "dtype"}
  audio.update(model_type="clap_audio_model", hidden_size=cfg.audio.num_features,
               projection_dim=cfg.heads.embed_dim, projection_hidden_act="relu",
               enable_fusion=False)
  text = {f.name: getattr(cfg.text, f.name) for f in dataclasses.fields(cfg.text)
          if f.name not in ("variant", "add_pooler", "dtype")}
  text.update(model_type="clap_text_model", projection_dim=cfg.heads.embed_dim,
              projection_hidden_act="relu")
  out = {"architectures": ["ClapModel"], "model_type": "clap", "dtype": "float32",
         "projection_dim": cfg.heads.embed_dim, "projection_hidden_act": "relu",
         "audio_config": audio, "text_config": text}
  return json.loads(json.dumps(out))  # tuples -> lists


def preprocessor_config(mel: frontend.LogMelConfig, crop_seconds: float, pad_mode: str) -> dict:
  """The `preprocessor_config.json` of a ClapProcessor computing `mel` on crops of
  `crop_seconds` (`LogMelConfig.from_hf` reads it back). HF crops longer clips at random
  ('rand_trunc'); hade_jax's head/center crop is the caller's to apply."""
  seconds = int(crop_seconds) if float(crop_seconds).is_integer() else float(crop_seconds)
  return {"feature_extractor_type": "ClapFeatureExtractor", "processor_class": "ClapProcessor",
          "feature_size": mel.n_mels, "sampling_rate": mel.sample_rate,
          "hop_length": mel.hop_length, "fft_window_size": mel.n_fft,
          "frequency_min": mel.f_min, "frequency_max": mel.f_max, "max_length_s": seconds,
          "truncation": "rand_trunc", "padding": _HF_PADDING[pad_mode], "padding_value": 0.0,
          "return_attention_mask": False}


def clap_state_dict(model: hade.HadeModel) -> dict[str, np.ndarray]:
  """Every tensor of a `ClapModel` state dict, from `model` (see the module docstring).

  HADE's own heads (THA levels, DCR) have no counterpart and are left out. The buffers HF
  saves are rebuilt: relative-position indices, id buffers, batch-norm counter; CLAP's two
  temperatures both get HADE's one shared temperature.
  """
  cfg = model.cfg
  state = common.export_params(model.audio_encoder, "audio_model.audio_encoder.")
  state |= common.export_params(model.text_encoder, "text_model.")
  for side in ("audio", "text"):
    state |= common.export_params(getattr(model.heads, f"{side}_projection"),
                                  f"{side}_projection.")
  index = htsat.relative_position_index(cfg.audio.window_size).astype(np.int64)
  for i, depth in enumerate(cfg.audio.depths):
    for j in range(depth):
      state[f"audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.self."
            "relative_position_index"] = index
  state["audio_model.audio_encoder.batch_norm.num_batches_tracked"] = np.zeros((), np.int64)
  positions = cfg.text.max_position_embeddings
  state["text_model.embeddings.position_ids"] = np.arange(positions, dtype=np.int64)[None]
  state["text_model.embeddings.token_type_ids"] = np.zeros((1, positions), np.int64)
  scale = np.asarray(model.heads.logit_scale[...], np.float32).reshape(())
  state["logit_scale_t"] = scale
  state["logit_scale_a"] = scale.copy()
  return state


def export_clap(model: hade.HadeModel, out_dir: str | pathlib.Path, *,
                crop_seconds: float = 10.0, pad_mode: str = "repeatpad",
                tokenizer_dir: str | pathlib.Path | None = None,
                overwrite: bool = False) -> pathlib.Path:
  """Writes a Hugging Face `ClapModel` folder (config.json, model.safetensors,
  preprocessor_config.json, the tokenizer files when given) of `model`'s towers and
  projections: `transformers.ClapModel.from_pretrained(out_dir)` gives the same global
  embeddings. HADE's THA/DCR heads are not part of it.

  Raises:
    NotClapShapedError: listing every way the model differs from a ClapModel.
    FileExistsError: `out_dir` holds files and `overwrite` is False.
  """
  from safetensors import numpy as safetensors_numpy

  from hade_jax import tokenizer

  problems = clap_shape_problems(model.cfg)
  if problems:
    raise NotClapShapedError("the model is not CLAP-shaped, so no Hugging Face ClapModel "
                             "folder can hold it:\n  " + "\n  ".join(problems))
  out = pathlib.Path(out_dir).expanduser().absolute()
  if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
    raise FileExistsError(f"{out} exists and is not an empty folder: choose a new folder, or "
                          "pass overwrite=True (--overwrite) to replace its files")
  out.mkdir(parents=True, exist_ok=True)
  if tokenizer_dir:
    for name in tokenizer.FILES:
      if (pathlib.Path(tokenizer_dir).expanduser() / name).is_file():
        shutil.copyfile(pathlib.Path(tokenizer_dir).expanduser() / name, out / name)
  safetensors_numpy.save_file(clap_state_dict(model), str(out / "model.safetensors"),
                              metadata={"format": "pt"})
  for name, value in (("preprocessor_config.json",
                       preprocessor_config(model.cfg.mel, crop_seconds, pad_mode)),
                      ("config.json", clap_config(model.cfg))):
    (out / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n",
                            encoding="utf-8")
  return out
