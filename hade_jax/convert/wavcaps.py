"""Imports WavCaps' HTS-AT + BERT retrieval checkpoints (Mei et al., `retrieval/models/
ase_model.py` `ASE`) into a HadeModel.

WavCaps' `train.py` saves `{'model': ASE.state_dict(), 'optimizer', 'config', 'epoch'}`; the
config (plain YAML values) names the front end (`audio_args`) and the text model
(`text_encoder_args.type`). Key map:
  audio_encoder.audio_enc.*   -> audio_encoder/*   (original HTS-AT names: convert.original)
  text_encoder.text_encoder.* -> text_encoder/*    (HF BertModel, built without a pooler)
  audio_proj.{0,2}            -> heads/audio_projection/linear{1,2}  (Linear-ReLU-Linear)
  text_proj.{0,2}             -> heads/text_projection/linear{1,2}
  temp                        -> heads/logit_scale = ln(1 / temp)   (WavCaps divides by temp)
WavCaps embeds a caption by projecting the last layer's [CLS] state, so the model is built
with `text_pool='cls'`. HADE's own heads (THA, DCR) keep their initialisation.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import frontend, hade
from hade_jax.convert import bert as convert_bert
from hade_jax.convert import common, laion, original, torch_ckpt

AUDIO_PREFIX = "audio_encoder.audio_enc."
TEXT_PREFIX = "text_encoder.text_encoder."


def mel_from_config(config: Mapping[str, Any] | None) -> frontend.LogMelConfig:
  """The front end a WavCaps config's `audio_args` describes (default: WavCaps' own)."""
  default = frontend.LogMelConfig.wavcaps()
  args = (config or {}).get("audio_args") or {}
  fields = {"sr": "sample_rate", "n_fft": "n_fft", "hop_length": "hop_length",
            "n_mels": "n_mels", "f_min": "f_min", "f_max": "f_max"}
  values = {ours: args[theirs] for theirs, ours in fields.items() if theirs in args}
  try:
    return frontend.LogMelConfig(**{**default.__dict__, **values})
  except (TypeError, ValueError) as e:
    raise common.ConversionError(f"WavCaps config audio_args {dict(args)}: {e}") from None


def config_from_checkpoint(ckpt: torch_ckpt.Checkpoint, *, mel: frontend.LogMelConfig | None = None,
                           text_variant: str | None = None, **heads_overrides) -> hade.HadeConfig:
  """A HadeConfig shaped like a WavCaps checkpoint (towers and joint width from shapes)."""
  tensors = ckpt.tensors
  audio = original.htsat_config_from_state_dict(tensors, AUDIO_PREFIX)
  variant = text_variant or laion.detect_text_variant(tensors, TEXT_PREFIX)
  text = original.text_config_from_state_dict(tensors, TEXT_PREFIX, variant=variant)
  if "text_proj.2.weight" not in tensors:
    raise common.ConversionError(f"{ckpt.path}: no text_proj.2.weight; not a WavCaps ASE "
                                 "checkpoint")
  embed_dim = int(tensors["text_proj.2.weight"].shape[0])
  mel = mel if mel is not None else mel_from_config(ckpt.meta.get("config"))
  original.check_front_end(tensors, AUDIO_PREFIX, audio, mel, str(ckpt.path))
  heads_overrides = {"text_pool": "cls"} | heads_overrides
  return original.hade_config(audio, text, embed_dim, mel, **heads_overrides)


def import_wavcaps(model: hade.HadeModel, source: torch_ckpt.Source, *,
                   strict: bool = True) -> common.ImportReport:
  """Copies a WavCaps ASE checkpoint (a path, a Checkpoint or a state dict) into `model`.

  Returns:
    An ImportReport over WavCaps' key names.
  """
  tensors, name = torch_ckpt.tensors_of(source)
  if model.cfg.heads.text_pool != "cls":
    raise common.ConversionError(f"{name}: WavCaps embeds captions by their [CLS] state; build "
                                 f"the model with heads.text_pool='cls', not "
                                 f"{model.cfg.heads.text_pool!r}")
  original.check_front_end(tensors, AUDIO_PREFIX, model.cfg.audio, model.cfg.mel, name)
  reports = [
      original.import_htsat_original(model.audio_encoder, tensors, prefix=AUDIO_PREFIX,
                                     strict=strict, source=name),
      convert_bert.import_bert(model.text_encoder, tensors, prefix=TEXT_PREFIX, strict=strict,
                               source=name),
      original.import_projection(model.heads.audio_projection, tensors, "audio_proj", name),
      original.import_projection(model.heads.text_projection, tensors, "text_proj", name),
  ]
  if "temp" not in tensors:
    raise common.ConversionError(f"{name} has no temp (WavCaps' softmax temperature)")
  temp = float(np.asarray(tensors["temp"]).reshape(()))
  if not temp > 0:
    raise common.ConversionError(f"{name}: temp = {temp} must be positive")
  model.heads.logit_scale[...] = jnp.asarray(math.log(1.0 / temp), jnp.float32)
  reports.append(common.ImportReport(source=name, loaded=["temp"]))
  return original.merge_reports(name, reports, tensors)


def load_wavcaps(path: str | pathlib.Path, *, mel: frontend.LogMelConfig | None = None,
                 text_variant: str | None = None, seed: int = 0, **heads_overrides
                 ) -> tuple[hade.HadeModel, common.ImportReport]:
  """Builds a HadeModel shaped like a WavCaps checkpoint file and imports it.

  Args:
    path: WavCaps' `.pt` (e.g. `HTSAT-BERT-PT.pt`, read with torch, weights_only=True) or a
      `.safetensors` file with the same key names.
    mel: the front end; default from the checkpoint's `config.audio_args`, else WavCaps' own
      (32 kHz, hop 320, 64 mels, 50-14000 Hz); checked against the stored filterbank.
    text_variant: 'bert' or 'roberta'; default from the token-type table.
    seed: initialisation seed of HADE's own heads.
    heads_overrides: HeadsConfig fields (levels, num_factors, ...).

  Returns:
    (model, import report over WavCaps' key names).
  """
  ckpt = torch_ckpt.read(path)
  cfg = config_from_checkpoint(ckpt, mel=mel, text_variant=text_variant, **heads_overrides)
  model = hade.HadeModel(cfg, rngs=nnx.Rngs(seed))
  return model, import_wavcaps(model, ckpt)
