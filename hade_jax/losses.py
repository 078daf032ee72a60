"""HADE objective: L = L_S + alpha L_D + beta L_A (docs/method.md section 5).

Legend: B: batch of (audio, text) pairs, A/T: audios/texts (= B in training), K: factors,
d: factor width, L: levels.

Batches hold one (clip, caption) pair per row; with Clotho's 5 captions per clip two rows may
share a clip. Targets are id-aware: every row whose id matches is a positive, and the
cross-entropy puts equal target mass on each positive (WavCaps-style multi-positive InfoNCE).
The ids are clip ids, or class ids in a labels folder (`input_pipeline.positive_ids`): clips
of one class share their template captions, so pushing them apart would fight the data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hade_jax import heads as hade_heads


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which loss terms are on, and their weights."""

  alpha: float = 0.005  # L_D weight (decorrelate different factors). [lineage DiCoSA]
  beta: float = 0.01  # L_A weight (align the same factor across modalities). [lineage DiCoSA]
  level_nce_weight: float = 0.0  # extra InfoNCE on each THA level, averaged (HiT). [choice]
  dcr_nce_weight: float = 0.0  # extra InfoNCE on S_DCR alone. [choice]
  # Extra InfoNCE on the global cosine alone, so the full model's global embedding ranks on its
  # own (two-stage search shortlists by it; in S it is only one term). [choice]
  global_nce_weight: float = 0.0


def positives(ids_A: jax.Array, ids_T: jax.Array) -> jax.Array:
  """[A, T] bool: audio row a and text row t come from the same clip (or class: the ids)."""
  return ids_A[:, None] == ids_T[None, :]


def info_nce(logits_AxT: jax.Array, pos_AxT: jax.Array) -> jax.Array:
  """Symmetric multi-positive InfoNCE, averaged over both directions.

  Text-to-audio: each text column t is a softmax over audios with target mass spread evenly
  over its positives; audio-to-text likewise over rows. Rows/columns without any positive
  contribute nothing.
  """
  pos = pos_AxT.astype(logits_AxT.dtype)

  def one_direction(logits, pos, axis):
    logp = jax.nn.log_softmax(logits, axis=axis)
    n_pos = pos.sum(axis)
    per_query = -(logp * pos).sum(axis) / jnp.maximum(n_pos, 1.0)
    has = (n_pos > 0).astype(logits.dtype)
    return (per_query * has).sum() / jnp.maximum(has.sum(), 1.0)

  t2a = one_direction(logits_AxT, pos, axis=0)
  a2t = one_direction(logits_AxT, pos, axis=1)
  return 0.5 * (t2a + a2t)


def factor_correlation(a_BxKxd: jax.Array, t_BxKxd: jax.Array) -> jax.Array:
  """C [K, K]: Pearson correlation between audio factor k and text factor k' on positive pairs.

  Each of the d dimensions is standardised over the batch; C_kk' averages, over the d
  dimensions j, the correlation of a_{., k, j} with t_{., k', j}. So C_kk = 1 when the two
  modalities' factor k agree up to a positive affine map per dimension. [choice: DiCoSA's
  cross-correlation taken per factor block]
  """
  def standardise(x):
    x = x - x.mean(0, keepdims=True)
    return x / jnp.maximum(jnp.sqrt((x * x).mean(0, keepdims=True)), 1e-6)

  a, t = standardise(a_BxKxd), standardise(t_BxKxd)
  return jnp.einsum("bkd,bld->kl", a, t) / (a.shape[0] * a.shape[-1])


def factor_losses(a_BxKxd: jax.Array, t_BxKxd: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(L_A, L_D): L_A = sum_k (1 - C_kk)^2, L_D = sum_{k != k'} C_kk'^2."""
  c_KxK = factor_correlation(a_BxKxd.astype(jnp.float32), t_BxKxd.astype(jnp.float32))
  diag_K = jnp.diagonal(c_KxK)
  l_align = jnp.sum((1.0 - diag_K) ** 2)
  l_decor = jnp.sum(c_KxK**2) - jnp.sum(diag_K**2)
  return l_align, l_decor


def hade_loss(heads: hade_heads.HadeHeads, audio: hade_heads.AudioFeatures,
              text: hade_heads.TextFeatures,
              ids_B: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of a paired batch (row b of `audio` goes with row b of `text`).

  Returns (loss, metrics) where metrics holds every term (and the temperature).
  """
  scores = heads.score(audio, text)
  scale = heads.logit_scale_value()
  pos_BxB = positives(ids_B, ids_B)
  l_s = info_nce(scale * scores["total"].astype(jnp.float32), pos_BxB)
  loss = l_s
  metrics = {"loss_s": l_s, "logit_scale": scale}
  if heads.cfg.use_dcr:
    l_a, l_d = factor_losses(audio.factors_AxKxd, text.factors_TxKxd)
    loss = loss + cfg.alpha * l_d + cfg.beta * l_a
    metrics |= {"loss_a": l_a, "loss_d": l_d}
    if cfg.dcr_nce_weight:
      l_dcr = info_nce(scale * scores["dcr"], pos_BxB)
      loss = loss + cfg.dcr_nce_weight * l_dcr
      metrics["loss_dcr_nce"] = l_dcr
  if cfg.global_nce_weight:
    # The global cosine is computed (scores["global"]) even with use_global off: a shortlist
    # embedding can be trained for the paper's S = S_THA + gamma S_DCR too.
    l_glob = info_nce(scale * scores["global"], pos_BxB)
    loss = loss + cfg.global_nce_weight * l_glob
    metrics["loss_global_nce"] = l_glob
  if heads.cfg.use_tha and cfg.level_nce_weight:
    per_level = jax.vmap(lambda s: info_nce(scale * s, pos_BxB))(scores["levels"])
    l_lv = per_level.mean()
    loss = loss + cfg.level_nce_weight * l_lv
    metrics["loss_levels_nce"] = l_lv
  metrics["loss"] = loss
  return loss, metrics
