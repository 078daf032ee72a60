"""HadeModel: log-mel front end + HTS-AT audio tower + BERT/RoBERTa text tower + HADE heads.

Specification: docs/method.md section 1; the heads are in `heads.py`.

Legend: A: audios, T: texts, S: samples, N: frames, F: mel bins, M: words, C: encoder width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from hade_jax import bert, frontend, htsat
from hade_jax import heads as hade_heads


@dataclasses.dataclass(frozen=True)
class HadeConfig:
  """The whole model: front end, audio tower, text tower and heads."""

  audio: htsat.HtsatConfig
  text: bert.BertConfig
  heads: hade_heads.HeadsConfig = hade_heads.HeadsConfig()
  mel: frontend.LogMelConfig = dataclasses.field(default_factory=frontend.LogMelConfig)

  def __post_init__(self):
    num_stages = len(self.audio.depths)
    for h, l in self.heads.levels if self.heads.use_tha else ():
      if not 1 <= h <= num_stages:
        raise ValueError(f"THA level ({h}, {l}): audio stage {h} not in 1..{num_stages}")
      if not 1 <= l <= self.text.num_hidden_layers:
        raise ValueError(f"THA level ({h}, {l}): text block {l} not in "
                         f"1..{self.text.num_hidden_layers}")
    if self.heads.text_pool == "pooler" and not self.text.add_pooler:
      raise ValueError("HeadsConfig.text_pool='pooler' needs a text tower with add_pooler=True")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> HadeConfig:
    """Builds from a (ml_collections) mapping with sub-mappings audio/text/heads/mel."""
    def build(dc, sub, retired=()):
      sub = {k: v for k, v in dict(sub or {}).items() if k not in retired}
      for key in ("levels",):
        if key in sub:
          sub[key] = tuple(tuple(x) for x in sub[key])
      for key, value in list(sub.items()):
        if isinstance(value, list):
          sub[key] = tuple(value)
      return dc(**sub)

    return cls(
        audio=build(htsat.HtsatConfig, config.get("audio")),
        text=build(bert.BertConfig, config.get("text")),
        heads=build(hade_heads.HeadsConfig, config.get("heads")),
        mel=build(frontend.LogMelConfig, config.get("mel"), frontend.RETIRED_KEYS),
    )


# ---------------------------------------------------------------------------------------------
# The full model.


class HadeModel(nnx.Module):
  """Audio tower (HTS-AT) + text tower (BERT/RoBERTa) + HADE heads.

  Parameter names: `audio_encoder/...` mirrors ClapAudioModel's `audio_encoder.*`,
  `text_encoder/...` mirrors BertModel/RobertaModel, `heads/audio_projection/linear1` mirrors
  ClapModel's `audio_projection.linear1`.
  """

  def __init__(self, cfg: HadeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.audio_encoder = htsat.HtsatModel(cfg.audio, rngs=rngs)
    self.text_encoder = bert.BertModel(cfg.text, rngs=rngs)
    stage_dims = cfg.audio.stage_widths  # Swin stages double the width at each merging.
    self.heads = hade_heads.HadeHeads(
        cfg.heads,
        audio_global_dim=stage_dims[-1],
        audio_stage_dims=stage_dims,
        text_dim=cfg.text.hidden_size,
        rngs=rngs)

  def encode_audio_mel(self, mel_AxNxF: jax.Array, *, rngs: nnx.Rngs | None = None
                       ) -> hade_heads.AudioFeatures:
    pooled_AxC, aux = self.audio_encoder(mel_AxNxF, rngs=rngs)
    return self.heads.audio_features(pooled_AxC, tuple(aux["frames"]), rngs=rngs)

  def encode_audio(self, wave_AxS: jax.Array, *, rngs: nnx.Rngs | None = None,
                   mel_transform=None) -> hade_heads.AudioFeatures:
    """Waveforms at cfg.mel.sample_rate (already cropped/padded) -> cached audio features.

    `mel_transform` (e.g. SpecAugment) is applied to the log-mel before the tower.
    """
    mel_AxNxF = frontend.log_mel(wave_AxS, self.cfg.mel)
    if mel_transform is not None:
      mel_AxNxF = mel_transform(mel_AxNxF)
    return self.encode_audio_mel(mel_AxNxF, rngs=rngs)

  def encode_text(self, input_ids_TxM: jax.Array, attention_mask_TxM: jax.Array, *,
                  rngs: nnx.Rngs | None = None) -> hade_heads.TextFeatures:
    _, aux = self.text_encoder(input_ids_TxM, attention_mask_TxM, rngs=rngs)
    return self.heads.text_features(tuple(aux["hidden_states"]), aux.get("pooled"),
                                    attention_mask_TxM, rngs=rngs)

  def score(self, audio: hade_heads.AudioFeatures, text: hade_heads.TextFeatures,
            blocked: bool = False) -> dict[str, jax.Array]:
    return self.heads.score(audio, text, blocked=blocked)


# ---------------------------------------------------------------------------------------------
# Construction from a training config (shared by training, evaluation, search and the API).


def model_config(config: Mapping[str, Any]) -> HadeConfig:
  """The HadeConfig of a whole config: `config.model`, with `config.compute_dtype` (default
  float32) applied to both towers."""
  cfg = HadeConfig.from_config(config["model"].to_dict() if hasattr(config["model"], "to_dict")
                               else config["model"])
  dtype = config.get("compute_dtype", "float32")
  if dtype != "float32":
    cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, dtype=dtype),
                              text=dataclasses.replace(cfg.text, dtype=dtype))
  return cfg


def split_model(model: HadeModel) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest): params train, rest (batch-norm statistics) does not."""
  return nnx.split(model, nnx.Param, ...)
