"""HADE heads (THA, DCR, CA) against a per-pair numpy reference written from docs/method.md."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hade_jax import heads as hade_heads
from hade_jax import losses
from tests import test_losses

STAGE_DIMS = (8, 16, 32, 64)
FRAMES = (16, 8, 4, 2)
TEXT_DIM, NUM_BLOCKS, A, T, M = 12, 3, 5, 6, 7

VARIANTS = {
    "tokens_none": dict(),
    "tokens_softmax_linear": dict(confidence_norm="softmax", dcr_linear=True),
    "pooled_sigmoid_cls": dict(level_sim="pooled", confidence_norm="sigmoid", text_pool="cls"),
    "pooled_mean_fixed": dict(level_sim="pooled", text_level_pool="mean", text_pool="mean",
                              learn_level_weights=False, projection="linear"),
    "attention_none": dict(level_sim="attention"),
    "global_only": dict(use_tha=False, use_dcr=False),
    "tha_only": dict(use_dcr=False, use_global=False),
    "dcr_only": dict(use_tha=False, use_global=False, dcr_weight=0.7),
}


def make_cfg(**overrides) -> hade_heads.HeadsConfig:
  base = dict(embed_dim=16, num_factors=4, levels=((1, 1), (2, 2), (4, 3)))
  return hade_heads.HeadsConfig(**(base | overrides))


def make_heads(cfg, seed=0):
  model = hade_heads.HadeHeads(cfg, audio_global_dim=STAGE_DIMS[-1], audio_stage_dims=STAGE_DIMS,
                               text_dim=TEXT_DIM, rngs=nnx.Rngs(seed))
  if cfg.use_tha and cfg.learn_level_weights:  # non-uniform weights, so a mix-up shows.
    model.level_logits[...] = jnp.asarray([0.3, -0.5, 0.9])
  if cfg.use_tha and cfg.level_sim == "attention":  # a temperature per level, so a mix-up shows
    for level, scale in zip(model.tha, (2.0, 7.0, 30.0), strict=True):
      level.attention_scale[...] = jnp.log(jnp.asarray(scale))
  return model


def encoder_outputs(seed=0, lengths=(7, 3, 5, 1, 6, 2)):
  rng = np.random.default_rng(seed)
  pooled = rng.normal(size=(A, STAGE_DIMS[-1])).astype(np.float32)
  frames = tuple(rng.normal(size=(A, n, c)).astype(np.float32)
                 for n, c in zip(FRAMES, STAGE_DIMS, strict=True))
  hidden = tuple(rng.normal(size=(T, M, TEXT_DIM)).astype(np.float32)
                 for _ in range(NUM_BLOCKS + 1))
  mask = (np.arange(M)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  text_pooled = rng.normal(size=(T, TEXT_DIM)).astype(np.float32)
  return pooled, frames, hidden, text_pooled, mask


def features(model, outs):
  pooled, frames, hidden, text_pooled, mask = outs
  a = model.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, frames)))
  t = model.text_features(tuple(map(jnp.asarray, hidden)), jnp.asarray(text_pooled),
                          jnp.asarray(mask))
  return a, t


# ---- per-pair numpy reference, written from docs/method.md sections 2-4 --------------------------


def np_cos(x, y):
  return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def reference_attention(model, k, aa, tt, alogit, tlogit):
  """An 'attention' level of one pair: every word attends over the frames and back."""
  scale = float(np.exp(model.tha[k].attention_scale[...]))
  wt, wa = np_softmax(tlogit), np_softmax(alogit)
  s_t = s_a = 0.0
  for w in range(len(tt)):
    cos = np.asarray([np_cos(tt[w], aa[f]) for f in range(len(aa))])
    s_t += wt[w] * float(np_softmax(scale * cos) @ cos)
  for f in range(len(aa)):
    cos = np.asarray([np_cos(tt[w], aa[f]) for w in range(len(tt))])
    s_a += wa[f] * float(np_softmax(scale * cos) @ cos)
  return 0.5 * (s_t + s_a)


def reference_score(model, cfg, a, t, i, j):
  """S(a_i, t_j) with explicit loops over words, frames and factors."""
  total, parts = 0.0, {}
  parts["global"] = np_cos(np.asarray(a.global_AxD[i]), np.asarray(t.global_TxD[j]))
  if cfg.use_global:
    total += cfg.global_weight * parts["global"]
  if cfg.use_tha:
    lam = np.asarray(model.level_weights())
    level_scores = []
    for k in range(len(cfg.levels)):
      am = np.asarray(a.level_masks[k][i])
      tm = np.asarray(t.level_masks[k][j])
      aa = np.asarray(a.levels[k][i])[am]
      tt = np.asarray(t.levels[k][j])[tm]
      if cfg.level_sim == "pooled":
        s = np_cos(aa[0], tt[0])
      elif cfg.level_sim == "attention":
        s = reference_attention(model, k, aa, tt, np.asarray(a.level_logits[k][i])[am],
                                np.asarray(t.level_logits[k][j])[tm])
      else:
        wt = np_softmax(np.asarray(t.level_logits[k][j])[tm])
        wa = np_softmax(np.asarray(a.level_logits[k][i])[am])
        s_t = sum(wt[w] * max(np_cos(tt[w], aa[f]) for f in range(len(aa))) for w in range(len(tt)))
        s_a = sum(wa[f] * max(np_cos(tt[w], aa[f]) for w in range(len(tt))) for f in range(len(aa)))
        s = 0.5 * (s_t + s_a)
      level_scores.append(s)
    parts["tha"] = float(np.dot(lam, level_scores))
    total += parts["tha"]
  if cfg.use_dcr:
    conf = model.dcr.confidence
    w1, b1 = np.asarray(conf.linear1.kernel[...]), np.asarray(conf.linear1.bias[...])
    w2, b2 = np.asarray(conf.linear2.kernel[...]), np.asarray(conf.linear2.bias[...])
    fa, ft = np.asarray(a.factors_AxKxd[i]), np.asarray(t.factors_TxKxd[j])
    cs, coss = [], []
    for k in range(cfg.num_factors):
      ak, tk = fa[k] / np.linalg.norm(fa[k]), ft[k] / np.linalg.norm(ft[k])
      h = np.maximum(np.concatenate([tk, ak]) @ w1 + b1, 0.0)
      cs.append(float(h @ w2[:, 0] + b2[0]))
      coss.append(np_cos(fa[k], ft[k]))
    cs = np.asarray(cs)
    if cfg.confidence_norm == "softmax":
      cs = np_softmax(cs)
    elif cfg.confidence_norm == "sigmoid":
      cs = 1 / (1 + np.exp(-cs))
    parts["dcr"] = float(np.dot(cs, coss))
    total += cfg.dcr_weight * parts["dcr"]
  return total, parts


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_all_pairs_score_equals_per_pair_reference(variant):
  cfg = make_cfg(**VARIANTS[variant])
  model = make_heads(cfg)
  a, t = features(model, encoder_outputs())
  scores = jax.jit(lambda a, t: model.score(a, t))(a, t)
  assert scores["total"].shape == (A, T)
  for i in range(A):
    for j in range(T):
      ref, parts = reference_score(model, cfg, a, t, i, j)
      np.testing.assert_allclose(scores["total"][i, j], ref, atol=2e-5, err_msg=f"pair {i},{j}")
      for name, value in parts.items():
        np.testing.assert_allclose(scores[name][i, j], value, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("variant", ["tokens_none", "tokens_softmax_linear", "tha_only",
                                     "attention_none", "pooled_sigmoid_cls"])
def test_blocked_score_equals_per_pair_reference(variant, monkeypatch):
  # Blocks of 2 clips: 5 clips make 3 blocks, the last padded; some frames masked out.
  monkeypatch.setattr(hade_heads, "TOKEN_BLOCK_CLIPS", 2)
  cfg = make_cfg(**VARIANTS[variant])
  model = make_heads(cfg)
  pooled, frames, hidden, text_pooled, mask = encoder_outputs(seed=2)
  frame_masks = tuple(jnp.arange(f.shape[1])[None] < jnp.asarray([f.shape[1], 1, 2, 3, 1])[:, None]
                      for f in frames)
  a = model.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, frames)), frame_masks)
  t = model.text_features(tuple(map(jnp.asarray, hidden)), jnp.asarray(text_pooled),
                          jnp.asarray(mask))
  blocked = jax.jit(lambda a, t: model.score(a, t, blocked=True))(a, t)
  plain = jax.jit(lambda a, t: model.score(a, t))(a, t)
  for key in plain:
    np.testing.assert_allclose(blocked[key], plain[key], atol=1e-6, err_msg=key)
  for i in range(A):
    for j in range(T):
      ref, _ = reference_score(model, cfg, a, t, i, j)
      np.testing.assert_allclose(blocked["total"][i, j], ref, atol=2e-5, err_msg=f"pair {i},{j}")


@pytest.mark.parametrize("norm,expected", [("none", "sum"), ("softmax", "mean")])
def test_constant_confidence_is_sum_of_factor_cosines(norm, expected):
  cfg = make_cfg(use_tha=False, use_global=False, confidence_norm=norm)
  model = make_heads(cfg)
  conf = model.dcr.confidence
  conf.linear2.kernel[...] = jnp.zeros_like(conf.linear2.kernel[...])
  conf.linear2.bias[...] = jnp.ones_like(conf.linear2.bias[...])
  a, t = features(model, encoder_outputs(seed=3))
  cos_AxTxK = jnp.einsum("akd,tkd->atk", hade_heads.normalize(a.factors_AxKxd),
                         hade_heads.normalize(t.factors_TxKxd))
  want = cos_AxTxK.sum(-1) if expected == "sum" else cos_AxTxK.mean(-1)
  np.testing.assert_allclose(model.score(a, t)["dcr"], want, atol=1e-6)


@pytest.mark.parametrize("variant", ["tokens_none", "pooled_mean_fixed", "tokens_softmax_linear",
                                     "attention_none"])
def test_padded_words_and_frames_change_no_score(variant):
  cfg = make_cfg(**VARIANTS[variant])
  model = make_heads(cfg)
  outs = encoder_outputs(seed=1)
  pooled, frames, hidden, text_pooled, mask = outs
  base = model.score(*features(model, outs))
  # Garbage at padded word positions.
  rng = np.random.default_rng(7)
  noisy = tuple(np.where(mask[..., None] > 0, h, 100 * rng.normal(size=h.shape)).astype(np.float32)
                for h in hidden)
  got = model.score(*features(model, (pooled, frames, noisy, text_pooled, mask)))
  for key in base:
    np.testing.assert_allclose(got[key], base[key], atol=1e-5, err_msg=key)
  # Extra padded frames (masked out) on every stage.
  long_frames = tuple(np.concatenate([f, 50 * rng.normal(size=(A, 3, f.shape[-1]))], 1)
                      .astype(np.float32) for f in frames)
  masks = tuple(jnp.arange(f.shape[1] + 3)[None].repeat(A, 0) < f.shape[1] for f in frames)
  a = model.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, long_frames)), masks)
  _, t = features(model, outs)
  got = model.score(a, t)
  for key in base:
    np.testing.assert_allclose(got[key], base[key], atol=1e-5, err_msg=key)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_gradients_are_finite_under_jit(variant):
  cfg = make_cfg(**VARIANTS[variant])
  model = make_heads(cfg)
  outs = encoder_outputs(seed=2, lengths=(7, 3, 5, 1, 6))  # T == A: paired batch
  pooled, frames, hidden, text_pooled, mask = outs
  hidden = tuple(h[:A] for h in hidden)
  ids = jnp.asarray([0, 1, 1, 2, 3])  # two captions of clip 1 in the batch
  graphdef, state = nnx.split(model)
  loss_cfg = losses.LossConfig(level_nce_weight=0.5, dcr_nce_weight=0.5)

  @jax.jit
  def loss_fn(state):
    heads = nnx.merge(graphdef, state)
    a = heads.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, frames)))
    t = heads.text_features(tuple(map(jnp.asarray, hidden)), jnp.asarray(text_pooled[:A]),
                            jnp.asarray(mask[:A]))
    return losses.hade_loss(heads, a, t, ids, loss_cfg)[0]

  loss, grads = jax.value_and_grad(loss_fn)(state)
  assert np.isfinite(loss)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  # The temperature is learnable: it receives a gradient (and so does each attention level's).
  assert float(jnp.abs(grads["logit_scale"][...])) > 0
  if cfg.use_tha and cfg.level_sim == "attention":
    assert all(float(jnp.abs(grads["tha"][k]["attention_scale"][...])) > 0 for k in range(3))


def test_level_weights_are_a_distribution():
  learned = make_heads(make_cfg())
  fixed = make_heads(make_cfg(learn_level_weights=False))
  np.testing.assert_allclose(learned.level_weights().sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(fixed.level_weights(), np.full(3, 1 / 3), rtol=1e-6)


def test_logit_scale_is_clamped_at_100():
  model = make_heads(make_cfg())
  np.testing.assert_allclose(model.logit_scale_value(), 1 / 0.07, rtol=1e-5)
  model.logit_scale[...] = jnp.asarray(10.0)
  np.testing.assert_allclose(model.logit_scale_value(), 100.0, rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(level_sim="max"), dict(confidence_norm="relu"),
                                 dict(embed_dim=15), dict(use_global=False, use_tha=False,
                                                          use_dcr=False)])
def test_bad_config_names_the_field(bad):
  with pytest.raises(ValueError, match="HeadsConfig"):
    dataclasses.replace(make_cfg(), **bad)


@pytest.mark.parametrize("variant", ["tokens_none", "tha_only"])
def test_global_nce_weight_adds_an_info_nce_on_the_global_cosine(variant):
  # tha_only: the global cosine is not in S, and the extra term still trains it (a shortlist).
  model = make_heads(make_cfg(**VARIANTS[variant]))
  pooled, frames, hidden, text_pooled, mask = encoder_outputs(seed=4, lengths=(7, 3, 5, 1, 6))
  a = model.audio_features(jnp.asarray(pooled), tuple(map(jnp.asarray, frames)))
  t = model.text_features(tuple(jnp.asarray(h[:A]) for h in hidden), jnp.asarray(text_pooled[:A]),
                          jnp.asarray(mask[:A]))
  ids = [0, 1, 1, 2, 3]
  base, m0 = losses.hade_loss(model, a, t, jnp.asarray(ids), losses.LossConfig())
  got, m1 = losses.hade_loss(model, a, t, jnp.asarray(ids),
                             losses.LossConfig(global_nce_weight=0.5))
  glob = np.asarray([[reference_score(model, model.cfg, a, t, i, j)[1]["global"]
                      for j in range(A)] for i in range(A)])
  want = test_losses.np_info_nce(float(model.logit_scale_value()) * glob, ids)
  assert "loss_global_nce" not in m0
  np.testing.assert_allclose(m1["loss_global_nce"], want, rtol=1e-5)
  np.testing.assert_allclose(got, base + 0.5 * want, rtol=1e-5)


@pytest.mark.parametrize("variant", ["tokens_none", "attention_none", "pooled_sigmoid_cls"])
def test_cutting_padding_words_keeps_every_score(variant, monkeypatch):
  # retrieval cuts a text tile's word axis to its longest caption (rounded to WORD_BUCKET):
  # padding words never count, so the scores stay those of the full width.
  from hade_jax import retrieval

  monkeypatch.setattr(retrieval, "WORD_BUCKET", 2)
  model = make_heads(make_cfg(**VARIANTS[variant]))
  a, t = features(model, encoder_outputs(seed=3, lengths=(3, 1, 2, 3, 1, 2)))
  host = jax.tree.map(np.asarray, t)
  pooled = variant.startswith("pooled")  # one token per caption: nothing to cut
  np.testing.assert_array_equal(retrieval.text_widths(host),
                                [1] * T if pooled else [3, 1, 2, 3, 1, 2])
  cut = retrieval.crop_words(host)
  assert [x.shape[1] for x in cut.levels] == [1 if pooled else 4] * len(cut.levels)
  assert [x.shape[1] for x in cut.level_masks] == [x.shape[1] for x in cut.levels]
  full = model.score(a, t, blocked=True)
  short = model.score(a, jax.tree.map(jnp.asarray, cut), blocked=True)
  for key in ("total", "tha", "levels"):
    np.testing.assert_allclose(short[key], full[key], atol=1e-6, err_msg=key)
