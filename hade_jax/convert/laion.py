"""Imports LAION-CLAP's own checkpoints (`630k-audioset-best.pt`, `music_*.pt`, ...) into a
HadeModel; non-fusion models with an HTS-AT (tiny or base) audio branch and a RoBERTa or BERT
text branch.

The files are `{'epoch', 'name', 'state_dict', 'optimizer'?}` with DistributedDataParallel's
`module.` on every key (both removed by `torch_ckpt.read`). Key map:
  audio_branch.*              -> audio_encoder/*      (original HTS-AT names: convert.original)
  text_branch.*               -> text_encoder/*       (HF RobertaModel / BertModel names)
  audio_projection.{0,2}      -> heads/audio_projection/linear{1,2}  (Linear-ReLU-Linear)
  text_projection.{0,2}       -> heads/text_projection/linear{1,2}
  logit_scale_t               -> heads/logit_scale    (CLAP scales text->audio logits by it)
Expected unused: `logit_scale_a` (HADE has one temperature), `audio_transform` /
`text_transform` (MLPs only LAION's training loss uses), the text position-id buffer and the
audio front end / AudioSet classifier (see convert.original). HADE's own heads (THA, DCR)
have no counterpart and keep their initialisation.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import frontend, hade
from hade_jax.convert import bert as convert_bert
from hade_jax.convert import common, original, torch_ckpt

AUDIO_PREFIX = "audio_branch."
TEXT_PREFIX = "text_branch."
_EXPECTED_UNUSED = re.compile(r"^(logit_scale_a$|audio_transform\.|text_transform\.)")

def detect_text_variant(tensors: Mapping[str, np.ndarray], prefix: str = TEXT_PREFIX) -> str:
  """'roberta' when the tower has one token type (roberta-base), else 'bert'."""
  types = tensors.get(prefix + "embeddings.token_type_embeddings.weight")
  if types is None:
    raise common.ConversionError(f"no text tower: {prefix}embeddings.token_type_embeddings."
                                 "weight is missing (only RoBERTa/BERT text branches import)")
  return "roberta" if types.shape[0] == 1 else "bert"


def config_from_state_dict(tensors: Mapping[str, np.ndarray], *,
                           mel: frontend.LogMelConfig | None = None,
                           text_variant: str | None = None,
                           audio_overrides: Mapping | None = None,
                           text_overrides: Mapping | None = None,
                           **heads_overrides) -> hade.HadeConfig:
  """A HadeConfig shaped like a LAION-CLAP state dict (towers and joint width from shapes).

  `mel` defaults to LAION-CLAP's front end (48 kHz, hop 480, 64 mels, 50-14000 Hz).
  """
  audio = original.htsat_config_from_state_dict(tensors, AUDIO_PREFIX, **(audio_overrides or {}))
  variant = text_variant or detect_text_variant(tensors)
  text = original.text_config_from_state_dict(tensors, TEXT_PREFIX, variant=variant,
                                              **(text_overrides or {}))
  if "text_projection.2.weight" not in tensors:
    raise common.ConversionError("no text_projection.2.weight: not a LAION-CLAP checkpoint with "
                                 "a BERT/RoBERTa text branch")
  embed_dim = int(tensors["text_projection.2.weight"].shape[0])
  mel = mel if mel is not None else frontend.LogMelConfig.laion_clap()
  original.check_front_end(tensors, AUDIO_PREFIX, audio, mel, "state dict")
  return original.hade_config(audio, text, embed_dim, mel, **heads_overrides)


def import_laion_clap(model: hade.HadeModel, source: torch_ckpt.Source, *,
                      strict: bool = True) -> common.ImportReport:
  """Copies a LAION-CLAP checkpoint (a `.pt` / `.safetensors` path, a Checkpoint or a state
  dict with the original key names) into `model` in place.

  Returns:
    An ImportReport over the original key names.
  """
  tensors, name = torch_ckpt.tensors_of(source)
  original.check_front_end(tensors, AUDIO_PREFIX, model.cfg.audio, model.cfg.mel, name)
  reports = [
      original.import_htsat_original(model.audio_encoder, tensors, prefix=AUDIO_PREFIX,
                                     strict=strict, source=name),
      convert_bert.import_bert(model.text_encoder, tensors, prefix=TEXT_PREFIX, strict=strict,
                               source=name),
      original.import_projection(model.heads.audio_projection, tensors, "audio_projection", name),
      original.import_projection(model.heads.text_projection, tensors, "text_projection", name),
  ]
  if "logit_scale_t" not in tensors:
    raise common.ConversionError(f"{name} has no logit_scale_t")
  model.heads.logit_scale[...] = jnp.asarray(np.asarray(tensors["logit_scale_t"]),
                                             jnp.float32).reshape(())
  reports.append(common.ImportReport(source=name, loaded=["logit_scale_t"]))
  return original.merge_reports(name, reports, tensors, _EXPECTED_UNUSED)


def load_laion_clap(path: str | pathlib.Path, *, mel: frontend.LogMelConfig | None = None,
                    text_variant: str | None = None, seed: int = 0, **heads_overrides
                    ) -> tuple[hade.HadeModel, common.ImportReport]:
  """Builds a HadeModel shaped like a LAION-CLAP checkpoint file and imports it.

  Args:
    path: LAION-CLAP's `.pt` (read with torch, weights_only=True) or a `.safetensors` file
      with the same key names.
    mel: the front end; default LAION-CLAP's, checked against the filterbank in the file.
    text_variant: 'roberta' or 'bert'; default from the token-type table (1 row: RoBERTa).
    seed: initialisation seed of HADE's own heads.
    heads_overrides: HeadsConfig fields (levels, num_factors, ...).

  Returns:
    (model, import report over the original key names).
  """
  ckpt = torch_ckpt.read(path)
  cfg = config_from_state_dict(ckpt.tensors, mel=mel, text_variant=text_variant,
                               **heads_overrides)
  model = hade.HadeModel(cfg, rngs=nnx.Rngs(seed))
  return model, import_laion_clap(model, ckpt)
