"""HADE heads: hierarchical alignment (THA), latent factors (DCR) and confidence (CA).

Specification: docs/method.md sections 2-4. Every [lineage]/[choice] point of the method is a
field of `HeadsConfig`, so ablations ("global only", "+THA", "+DCR", "+THA+DCR") are configs.

Scores are computed for ALL (audio, text) pairs of two feature sets at once; each modality is
turned into cacheable features once (`audio_features` / `text_features`) and `score` only does
the pairwise part, so retrieval over a corpus can tile it.

Legend:
  A: audios, T: texts, K: factors, L: levels, N: frames, M: words, D: joint width,
  d: factor width (D / K), C: encoder width, H: hidden width of an MLP.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hade_jax import fields, layers

_EPS = 1e-8
# 'attention' levels: the word-frame softmax starts at temperature 0.1 (scale 10 on cosines in
# [-1, 1]: between the mean (scale 0) and `tokens`' hard max (scale -> inf)) and is learned per
# level as log(1 / temperature), clamped like the logit scale at `max_logit_scale`. A constant,
# not a HeadsConfig field, so configs saved by earlier versions keep resuming. [choice]
ATTENTION_TEMPERATURE_INIT = 0.1
LEVEL_SIMS = ("tokens", "pooled", "attention")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  """The HADE heads on top of the two towers (docs/method.md sections 2-5)."""

  embed_dim: int = 512  # D, width of the joint space.
  # Global embeddings: 'clap' = Linear-ReLU-Linear as LAION-CLAP's projection layers, 'linear'.
  projection: str = "clap"
  # Text global input: 'pooler' (BERT/CLAP pooler on [CLS]), 'cls' (raw [CLS] state),
  # 'mean' (mean of valid words, as sentence-transformers).
  text_pool: str = "pooler"
  use_global: bool = True  # cosine of the global embeddings in the total score.
  global_weight: float = 1.0
  use_tha: bool = True
  # THA level set: (audio stage h in 1..4, text block l in 1..num_layers). [choice]
  levels: tuple[tuple[int, int], ...] = ((2, 4), (3, 8), (4, 12))
  # 'tokens' (DRL/WTA weighted max-cosine), 'pooled' (HiT) or 'attention' (words attend over
  # frames and frames over words, softmax of scaled cosines with a learnable temperature).
  level_sim: str = "tokens"
  text_level_pool: str = "cls"  # for 'pooled' levels: 'cls' or 'mean' of valid words.
  learn_level_weights: bool = True  # lambda = softmax(logits) learnable, else fixed 1/L.
  use_dcr: bool = True
  num_factors: int = 8  # K. [lineage DiCoSA]
  dcr_linear: bool = False  # a linear map before the factor split. [choice]
  confidence_norm: str = "none"  # 'none' (DiCoSA), 'softmax' over k, or 'sigmoid'.
  dcr_weight: float = 1.0  # gamma in S = S_THA + gamma S_DCR.
  temperature_init: float = 0.07  # logit scale starts at ln(1 / 0.07).
  max_logit_scale: float = 100.0  # exp(s) clamped here (CLIP).
  dropout: float = 0.0

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    p.choice("projection", ("clap", "linear"))
    p.choice("text_pool", ("pooler", "cls", "mean"))
    p.choice("level_sim", LEVEL_SIMS)
    p.choice("text_level_pool", ("cls", "mean"))
    p.choice("confidence_norm", ("none", "softmax", "sigmoid"))
    p.at_least("embed_dim", 1)
    p.at_least("num_factors", 1)  # before embed_dim % num_factors
    for name in ("global_weight", "dcr_weight", "max_logit_scale"):
      p.at_least(name, 0.0)
    p.positive("temperature_init")
    p.within("dropout", 0.0, 1.0)
    if not p.bad("levels") and not all(
        fields.is_seq(x) and len(x) == 2 and all(fields.is_int(i) for i in x)
        for x in self.levels):
      p.add("levels", f"expected (audio stage, text block) integer pairs, got {self.levels!r}")
    if p.items:
      p.raise_any()
    if not (self.use_global or self.use_tha or self.use_dcr):
      p.add("", "at least one of use_global, use_tha, use_dcr must be on")
    if self.use_dcr and self.embed_dim % self.num_factors:
      p.add("embed_dim", f"{self.embed_dim} is not divisible by num_factors={self.num_factors}")
    if self.use_tha and not self.levels:
      p.add("levels", "is empty while use_tha is on")
    # The heads' largest weights are D x D (CLAP projections, the DCR linear map).
    p.param_bytes(4 * self.embed_dim * self.embed_dim, ("embed_dim",))
    p.raise_any()


# ---------------------------------------------------------------------------------------------
# Cached features. Everything pairwise-independent is computed once per modality.


@struct.dataclass
class AudioFeatures:
  global_AxD: jax.Array  # projected global embedding (not normalised).
  levels: tuple[jax.Array, ...]  # per THA level: L2-normalised tokens [A, N_k, D].
  level_masks: tuple[jax.Array, ...]  # [A, N_k] bool.
  level_logits: tuple[jax.Array, ...]  # token-weight logits [A, N_k] ('tokens'/'attention').
  factors_AxKxd: jax.Array | None  # DCR factors (after the optional linear map).


@struct.dataclass
class TextFeatures:
  global_TxD: jax.Array
  levels: tuple[jax.Array, ...]  # [T, M, D] normalised word tokens (or [T, 1, D] pooled).
  level_masks: tuple[jax.Array, ...]  # [T, M] bool.
  level_logits: tuple[jax.Array, ...]
  factors_TxKxd: jax.Array | None


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), _EPS)


def masked_mean(x_BxNxC: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  w_BxN = mask_BxN.astype(x_BxNxC.dtype)
  return jnp.einsum("bnc,bn->bc", x_BxNxC, w_BxN) / jnp.maximum(w_BxN.sum(-1, keepdims=True), 1.0)


# ---------------------------------------------------------------------------------------------
# Head modules.


class Projection(nnx.Module):
  """LAION-CLAP's projection (linear1 -> ReLU -> linear2) or a single linear layer."""

  def __init__(self, in_dim: int, out_dim: int, kind: str, *, rngs: nnx.Rngs):
    self.kind = kind
    self.linear1 = nnx.Linear(in_dim, out_dim, rngs=rngs)
    if kind == "clap":
      self.linear2 = nnx.Linear(out_dim, out_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear1(x)
    if self.kind == "clap":
      x = self.linear2(jax.nn.relu(x))
    return x


class TokenWeights(nnx.Module):
  """DRL-style token importance: logits = MLP(token) (Linear D->D, ReLU, Linear D->1)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(dim, dim, rngs=rngs)
    self.linear2 = nnx.Linear(dim, 1, rngs=rngs)

  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    return self.linear2(jax.nn.relu(self.linear1(x_BxNxD)))[..., 0]


class ThaLevel(nnx.Module):
  """One (audio stage, text block) level: projections P_a^k, P_t^k (+ token weights, and the
  attention temperature of 'attention' levels, stored as log(1 / temperature))."""

  def __init__(self, audio_dim: int, text_dim: int, cfg: HeadsConfig, *, rngs: nnx.Rngs):
    self.audio_proj = nnx.Linear(audio_dim, cfg.embed_dim, rngs=rngs)
    self.text_proj = nnx.Linear(text_dim, cfg.embed_dim, rngs=rngs)
    if cfg.level_sim in ("tokens", "attention"):
      self.audio_weights = TokenWeights(cfg.embed_dim, rngs=rngs)
      self.text_weights = TokenWeights(cfg.embed_dim, rngs=rngs)
    if cfg.level_sim == "attention":
      self.attention_scale = nnx.Param(
          jnp.asarray(math.log(1.0 / ATTENTION_TEMPERATURE_INIT), jnp.float32))


class Confidence(nnx.Module):
  """CA: c_k(a, t) = MLP([t^k ; a^k]), Linear 2d->4d, ReLU, Linear 4d->1, shared over k."""

  def __init__(self, factor_dim: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(2 * factor_dim, 4 * factor_dim, rngs=rngs)
    self.linear2 = nnx.Linear(4 * factor_dim, 1, rngs=rngs)


class Dcr(nnx.Module):
  """DCR factors and their confidence module."""

  def __init__(self, cfg: HeadsConfig, *, rngs: nnx.Rngs):
    d = cfg.embed_dim // cfg.num_factors
    if cfg.dcr_linear:
      self.audio_linear = nnx.Linear(cfg.embed_dim, cfg.embed_dim, rngs=rngs)
      self.text_linear = nnx.Linear(cfg.embed_dim, cfg.embed_dim, rngs=rngs)
    self.confidence = Confidence(d, rngs=rngs)


class HadeHeads(nnx.Module):
  """Everything of HADE that sits on top of the encoders' outputs."""

  def __init__(self, cfg: HeadsConfig, *, audio_global_dim: int, audio_stage_dims: tuple[int, ...],
               text_dim: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.audio_projection = Projection(audio_global_dim, cfg.embed_dim, cfg.projection, rngs=rngs)
    self.text_projection = Projection(text_dim, cfg.embed_dim, cfg.projection, rngs=rngs)
    if cfg.use_tha:
      self.tha = nnx.List([ThaLevel(audio_stage_dims[h - 1], text_dim, cfg, rngs=rngs)
                           for h, _ in cfg.levels])
      if cfg.learn_level_weights:
        self.level_logits = nnx.Param(jnp.zeros((len(cfg.levels),), jnp.float32))
    if cfg.use_dcr:
      self.dcr = Dcr(cfg, rngs=rngs)
    # CLIP-style learnable temperature, stored as log(1 / tau).
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1.0 / cfg.temperature_init), jnp.float32))

  # -- per-modality features -------------------------------------------------------------------

  def _factors(self, g_BxD: jax.Array, linear: nnx.Linear | None) -> jax.Array:
    if linear is not None:
      g_BxD = linear(g_BxD)
    k = self.cfg.num_factors
    return g_BxD.reshape(*g_BxD.shape[:-1], k, g_BxD.shape[-1] // k)

  def audio_features(self, pooled_AxC: jax.Array, frames: tuple[jax.Array, ...],
                     frame_masks: tuple[jax.Array, ...] | None = None,
                     rngs: nnx.Rngs | None = None) -> AudioFeatures:
    """Features of audio-tower outputs: pooled [A, C] and per-stage frames [A, N_h, C_h]."""
    cfg = self.cfg
    pooled_AxC = layers.dropout(pooled_AxC, cfg.dropout, rngs)
    g_AxD = self.audio_projection(pooled_AxC)
    levels, masks, logits = [], [], []
    if cfg.use_tha:
      for (h, _), level in zip(cfg.levels, self.tha, strict=True):
        x_AxNxC = frames[h - 1]
        mask_AxN = (jnp.ones(x_AxNxC.shape[:2], bool) if frame_masks is None
                    else frame_masks[h - 1])
        x_AxNxD = level.audio_proj(layers.dropout(x_AxNxC, cfg.dropout, rngs))
        if cfg.level_sim in ("tokens", "attention"):
          logits.append(level.audio_weights(x_AxNxD))
        else:  # HiT: one pooled vector per clip.
          x_AxNxD = masked_mean(x_AxNxD, mask_AxN)[:, None]
          mask_AxN = jnp.ones(x_AxNxD.shape[:2], bool)
          logits.append(jnp.zeros(x_AxNxD.shape[:2], x_AxNxD.dtype))
        levels.append(normalize(x_AxNxD))
        masks.append(mask_AxN)
    factors = None
    if cfg.use_dcr:
      factors = self._factors(g_AxD, self.dcr.audio_linear if cfg.dcr_linear else None)
    return AudioFeatures(g_AxD, tuple(levels), tuple(masks), tuple(logits), factors)

  def text_features(self, hidden_states: tuple[jax.Array, ...], pooled_TxC: jax.Array | None,
                    mask_TxM: jax.Array, rngs: nnx.Rngs | None = None) -> TextFeatures:
    """Features of text-tower outputs: every block's states [T, M, C] (index 0 = embeddings)."""
    cfg = self.cfg
    mask_TxM = mask_TxM.astype(bool)
    last_TxMxC = hidden_states[-1]
    if cfg.text_pool == "pooler":
      g_TxC = pooled_TxC
    elif cfg.text_pool == "cls":
      g_TxC = last_TxMxC[:, 0]
    else:
      g_TxC = masked_mean(last_TxMxC, mask_TxM)
    g_TxD = self.text_projection(layers.dropout(g_TxC, cfg.dropout, rngs))
    levels, masks, logits = [], [], []
    if cfg.use_tha:
      for (_, l), level in zip(cfg.levels, self.tha, strict=True):
        x_TxMxD = level.text_proj(layers.dropout(hidden_states[l], cfg.dropout, rngs))
        if cfg.level_sim in ("tokens", "attention"):
          m_TxM = mask_TxM
          logits.append(level.text_weights(x_TxMxD))
        else:
          if cfg.text_level_pool == "cls":
            x_TxMxD = x_TxMxD[:, :1]
          else:
            x_TxMxD = masked_mean(x_TxMxD, mask_TxM)[:, None]
          m_TxM = jnp.ones(x_TxMxD.shape[:2], bool)
          logits.append(jnp.zeros(x_TxMxD.shape[:2], x_TxMxD.dtype))
        levels.append(normalize(x_TxMxD))
        masks.append(m_TxM)
    factors = None
    if cfg.use_dcr:
      factors = self._factors(g_TxD, self.dcr.text_linear if cfg.dcr_linear else None)
    return TextFeatures(g_TxD, tuple(levels), tuple(masks), tuple(logits), factors)

  # -- pairwise scores -------------------------------------------------------------------------

  def level_weights(self) -> jax.Array:
    n = len(self.cfg.levels)
    if self.cfg.learn_level_weights:
      return jax.nn.softmax(self.level_logits[...])
    return jnp.full((n,), 1.0 / n, jnp.float32)

  def attention_scales(self) -> list[jax.Array]:
    """Per 'attention' level: 1 / temperature of its softmax, clamped at `max_logit_scale`."""
    top = math.log(self.cfg.max_logit_scale)
    return [jnp.exp(jnp.minimum(level.attention_scale[...], top)) for level in self.tha]

  def score(self, a: AudioFeatures, t: TextFeatures, blocked: bool = False
            ) -> dict[str, jax.Array]:
    """All-pairs scores: 'total' [A, T] plus each term ('global', 'tha', 'levels', 'dcr').

    `blocked`: THA 'tokens' levels and the DCR confidences in blocks of clips (the same
    scores within float32 rounding, faster for large A x T), for retrieval.
    """
    cfg = self.cfg
    out: dict[str, jax.Array] = {}
    num_a, num_t = a.global_AxD.shape[0], t.global_TxD.shape[0]
    total_AxT = jnp.zeros((num_a, num_t), jnp.float32)
    glob_AxT = jnp.einsum("ad,td->at", normalize(a.global_AxD), normalize(t.global_TxD))
    out["global"] = glob_AxT
    if cfg.use_global:
      total_AxT = total_AxT + cfg.global_weight * glob_AxT
    if cfg.use_tha:
      scales = (self.attention_scales() if cfg.level_sim == "attention"
                else [None] * len(cfg.levels))
      inputs = zip(scales, a.levels, a.level_masks, a.level_logits, t.levels, t.level_masks,
                   t.level_logits, strict=True)
      per_level = [level_similarity(*args, cfg.level_sim, scale=scale, blocked=blocked)
                   for scale, *args in inputs]
      levels_LxAxT = jnp.stack(per_level)
      tha_AxT = jnp.einsum("l,lat->at", self.level_weights(), levels_LxAxT)
      out["levels"], out["tha"] = levels_LxAxT, tha_AxT
      total_AxT = total_AxT + tha_AxT
    if cfg.use_dcr:
      dcr_AxT, conf_AxTxK = self.dcr_score(a.factors_AxKxd, t.factors_TxKxd, blocked)
      out["dcr"], out["confidence"] = dcr_AxT, conf_AxTxK
      total_AxT = total_AxT + cfg.dcr_weight * dcr_AxT
    out["total"] = total_AxT
    return out

  def dcr_score(self, a_AxKxd: jax.Array, t_TxKxd: jax.Array, blocked: bool = False
                ) -> tuple[jax.Array, jax.Array]:
    """S_DCR = sum_k c_k(a, t) cos(t^k, a^k) for all pairs; returns (S [A,T], c [A,T,K]).

    `blocked`: the confidence MLP DCR_BLOCK_CLIPS clips at a time (retrieval), same values.
    """
    a_AxKxd, t_TxKxd = normalize(a_AxKxd), normalize(t_TxKxd)
    cos_AxTxK = jnp.einsum("akd,tkd->atk", a_AxKxd, t_TxKxd)
    # Linear(2d -> 4d) on [t^k ; a^k] is W_t t^k + W_a a^k + b: apply each half per modality
    # and broadcast over pairs, instead of materialising the [A, T, K, 2d] concatenation.
    conf = self.dcr.confidence
    d = a_AxKxd.shape[-1]
    w1_2dxH = conf.linear1.kernel[...]
    w2_H = conf.linear2.kernel[...][:, 0]
    h_AxKxH = jnp.einsum("akd,dh->akh", a_AxKxd, w1_2dxH[d:])
    if blocked:
      c_AxTxK = _blocked_confidence(h_AxKxH, jnp.einsum("tkd,dh->kht", t_TxKxd, w1_2dxH[:d])
                                    + conf.linear1.bias[...][None, :, None], w2_H)
    else:
      h_TxKxH = jnp.einsum("tkd,dh->tkh", t_TxKxd, w1_2dxH[:d])
      h_AxTxKxH = jax.nn.relu(h_AxKxH[:, None] + h_TxKxH[None] + conf.linear1.bias[...])
      c_AxTxK = jnp.einsum("atkh,h->atk", h_AxTxKxH, w2_H)
    c_AxTxK = c_AxTxK + conf.linear2.bias[...][0]
    if self.cfg.confidence_norm == "softmax":
      c_AxTxK = jax.nn.softmax(c_AxTxK, axis=-1)
    elif self.cfg.confidence_norm == "sigmoid":
      c_AxTxK = jax.nn.sigmoid(c_AxTxK)
    return jnp.einsum("atk,atk->at", c_AxTxK, cos_AxTxK), c_AxTxK

  def logit_scale_value(self) -> jax.Array:
    return jnp.exp(jnp.minimum(self.logit_scale[...], math.log(self.cfg.max_logit_scale)))


# Retrieval scores 'tokens' levels TOKEN_BLOCK_CLIPS clips at a time (`score(...,
# blocked=True)`): each block's cosines are one matrix product [block N, D] x [D, M T], the
# captions' words in word-major order, so both maxima (over frames, over words) reduce across
# whole rows of T contiguous captions and vectorise; the block's product stays in cache while
# they read it. No mask is applied inside: padding tokens are first replaced by a copy of a
# valid token of the same row (`_fill_padding`), which cannot change a maximum, and their
# weights are 0. The plain formula writes an [A, T, M, N] tensor to memory and reads it back
# twice with masks (benchmarks/pair_score.py measures both). Scores agree within float32
# rounding (1e-6); the loss keeps the plain formula, so training's numbers do not change.
# [choice]
TOKEN_BLOCK_CLIPS = 8


def level_similarity(a_AxNxD, amask_AxN, alogit_AxN, t_TxMxD, tmask_TxM, tlogit_TxM,
                     kind: str, scale: jax.Array | None = None, blocked: bool = False
                     ) -> jax.Array:
  """One THA level s_k for all pairs (inputs already L2-normalised).

  'tokens' (DRL's weighted token-wise interaction):
    s = 1/2 [ sum_i w^t_i max_j cos(t_i, a_j) + sum_j w^a_j max_i cos(t_i, a_j) ],
  with w = softmax of the token logits over valid tokens; invalid tokens never win a max.
  'attention' (cross-attention): each max becomes an attention-weighted mean of the cosines,
    max_j cos(t_i, a_j) -> sum_j softmax_j(scale cos(t_i, a_.)) cos(t_i, a_j),
  the softmax over valid frames (over valid words for the audio side); `scale` = 1 / the
  learnable temperature. Scale -> inf is 'tokens', scale 0 the plain mean.
  'pooled' (HiT): one token per side, s = cos.
  `blocked`: 'tokens' in blocks of clips (TOKEN_BLOCK_CLIPS), the same scores faster for large
  A x T.
  """
  if kind == "pooled":
    return jnp.einsum("ad,td->at", a_AxNxD[:, 0], t_TxMxD[:, 0])
  wt_TxM = jax.nn.softmax(jnp.where(tmask_TxM, tlogit_TxM, -jnp.inf), axis=-1)
  wa_AxN = jax.nn.softmax(jnp.where(amask_AxN, alogit_AxN, -jnp.inf), axis=-1)
  if kind == "tokens" and blocked:
    return _blocked_tokens(a_AxNxD, amask_AxN, wa_AxN, t_TxMxD, tmask_TxM, wt_TxM)
  neg = jnp.asarray(-1e4, a_AxNxD.dtype)
  cos_AxTxMxN = jnp.einsum("and,tmd->atmn", a_AxNxD, t_TxMxD)
  if kind == "attention":
    # The masks go into the softmax logits, so padding gets no attention; the rows of padding
    # words (columns of padding frames) are zeroed by the masked token weights below. One
    # temperature per level serves both directions.
    att_AxTxMxN = jax.nn.softmax(jnp.where(amask_AxN[:, None, None, :], scale * cos_AxTxMxN,
                                           neg), axis=-1)
    t2a_AxTxM = jnp.einsum("atmn,atmn->atm", att_AxTxMxN, cos_AxTxMxN)
    att_AxTxMxN = jax.nn.softmax(jnp.where(tmask_TxM[None, :, :, None], scale * cos_AxTxMxN,
                                           neg), axis=-2)
    a2t_AxTxN = jnp.einsum("atmn,atmn->atn", att_AxTxMxN, cos_AxTxMxN)
  else:
    t2a_AxTxM = jnp.max(jnp.where(amask_AxN[:, None, None, :], cos_AxTxMxN, neg), axis=-1)
    a2t_AxTxN = jnp.max(jnp.where(tmask_TxM[None, :, :, None], cos_AxTxMxN, neg), axis=-2)
  t_part = jnp.einsum("atm,tm->at", jnp.where(tmask_TxM[None], t2a_AxTxM, 0.0), wt_TxM)
  a_part = jnp.einsum("atn,an->at", jnp.where(amask_AxN[:, None], a2t_AxTxN, 0.0), wa_AxN)
  return 0.5 * (t_part + a_part)


def _fill_padding(x_BxNxD: jax.Array, mask_BxN: jax.Array) -> jax.Array:
  """Each padding token replaced by the row's first valid token (rows without one unchanged)."""
  first_B = jnp.argmax(mask_BxN, axis=-1)
  src_BxN = jnp.where(mask_BxN, jnp.arange(mask_BxN.shape[-1])[None], first_B[:, None])
  return jnp.take_along_axis(x_BxNxD, src_BxN[..., None], axis=1)


def _blocked_tokens(a_AxNxD, amask_AxN, wa_AxN, t_TxMxD, tmask_TxM, wt_TxM) -> jax.Array:
  """'tokens' level_similarity given the token weights, TOKEN_BLOCK_CLIPS clips at a time."""
  (num_a, n, d), (num_t, m, _) = a_AxNxD.shape, t_TxMxD.shape
  a_AxNxD = _fill_padding(a_AxNxD, amask_AxN)
  t_DxMT = jnp.transpose(_fill_padding(t_TxMxD, tmask_TxM), (2, 1, 0)).reshape(d, m * num_t)
  wt_MxT = wt_TxM.T

  def block(xs):
    a_BxNxD, wa_BxN = xs
    b = a_BxNxD.shape[0]
    cos_BxNxMxT = jnp.dot(a_BxNxD.reshape(b * n, d), t_DxMT).reshape(b, n, m, num_t)
    t_part = jnp.einsum("bmt,mt->bt", jnp.max(cos_BxNxMxT, axis=1), wt_MxT)
    a_part = jnp.einsum("bnt,bn->bt", jnp.max(cos_BxNxMxT, axis=2), wa_BxN)
    return 0.5 * (t_part + a_part)

  blocks = -(-num_a // TOKEN_BLOCK_CLIPS)

  def split(x):  # [A, ...] -> [blocks, block, ...]; padding rows (weight 0) are cropped below
    x = jnp.pad(x, [(0, blocks * TOKEN_BLOCK_CLIPS - num_a)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(blocks, TOKEN_BLOCK_CLIPS, *x.shape[1:])

  out = jax.lax.map(block, (split(a_AxNxD), split(wa_AxN)))
  return out.reshape(blocks * TOKEN_BLOCK_CLIPS, num_t)[:num_a]


# Retrieval evaluates the confidence MLP's hidden layer DCR_BLOCK_CLIPS clips at a time, in a
# [block, K, H, T] layout: the sum over H then adds whole rows of T contiguous captions, and the
# block's hidden activations stay in cache instead of an [A, T, K, H] tensor going to memory
# (2.5-3x faster on a 128 x 128 tile on the 2-core CPU). [choice]
DCR_BLOCK_CLIPS = 16


def _blocked_confidence(h_AxKxH: jax.Array, h_KxHxT: jax.Array, w2_H: jax.Array) -> jax.Array:
  """[A, T, K] sum_h w2_h relu(h_akh + h_kht): the confidence logits before linear2's bias."""
  def block(h_KxH):
    return jnp.sum(jax.nn.relu(h_KxH[..., None] + h_KxHxT) * w2_H[:, None], axis=1)

  return jax.lax.map(block, h_AxKxH, batch_size=DCR_BLOCK_CLIPS).transpose(0, 2, 1)
