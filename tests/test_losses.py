"""HADE losses against numpy references (docs/method.md section 5)."""

import jax.numpy as jnp
import numpy as np
import pytest

from hade_jax import losses


def np_info_nce(logits, ids):
  """Symmetric multi-positive InfoNCE with explicit loops."""
  n_a, n_t = logits.shape
  def lse(v):
    m = v.max()
    return m + np.log(np.exp(v - m).sum())
  t2a = []
  for t in range(n_t):
    pos = [a for a in range(n_a) if ids[a] == ids[t]]
    t2a.append(-np.mean([logits[a, t] - lse(logits[:, t]) for a in pos]))
  a2t = []
  for a in range(n_a):
    pos = [t for t in range(n_t) if ids[a] == ids[t]]
    a2t.append(-np.mean([logits[a, t] - lse(logits[a, :]) for t in pos]))
  return 0.5 * (np.mean(t2a) + np.mean(a2t))


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 0, 3], [7, 7, 7, 7, 7, 2]])
def test_info_nce_matches_numpy_with_duplicate_ids(ids):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 6)) * 5
  ids_arr = jnp.asarray(ids)
  got = losses.info_nce(jnp.asarray(logits, jnp.float32), losses.positives(ids_arr, ids_arr))
  np.testing.assert_allclose(got, np_info_nce(logits, ids), rtol=1e-5)


def test_info_nce_unique_ids_is_clip_loss():
  """With distinct ids it is CLIP's loss: mean of the two cross-entropies on the diagonal."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 4)) * 3
  ce_rows = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(4)])
  ce_cols = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(4)])
  ids = jnp.arange(4)
  got = losses.info_nce(jnp.asarray(logits, jnp.float32), losses.positives(ids, ids))
  np.testing.assert_allclose(got, 0.5 * (ce_rows + ce_cols), rtol=1e-5)


def hadamard(n):
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def test_factor_losses_vanish_for_matching_decorrelated_factors():
  # Columns 1..8 of a 16x16 Hadamard matrix: zero mean, mutually orthogonal over the batch.
  a_BxKxd = hadamard(16)[:, 1:9].reshape(16, 4, 2).astype(np.float32)
  l_align, l_decor = losses.factor_losses(jnp.asarray(a_BxKxd), jnp.asarray(a_BxKxd))
  assert abs(float(l_align)) < 1e-6 and abs(float(l_decor)) < 1e-6


def test_factor_losses_detect_misalignment_and_correlation():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(32, 4, 2)).astype(np.float32)
  t = rng.normal(size=(32, 4, 2)).astype(np.float32)
  l_align, _ = losses.factor_losses(jnp.asarray(a), jnp.asarray(t))
  assert float(l_align) > 1.0  # independent factors: C_kk ~ 0, so L_A ~ K
  dup = np.repeat(a[:, :1], 4, axis=1)  # every factor identical: off-diagonal C = 1
  _, l_decor = losses.factor_losses(jnp.asarray(dup), jnp.asarray(dup))
  np.testing.assert_allclose(l_decor, 4 * 3, rtol=1e-4)


def test_factor_correlation_matches_numpy_pearson():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(20, 3, 4))
  t = a + rng.normal(size=a.shape)
  got = np.asarray(losses.factor_correlation(jnp.asarray(a, jnp.float32),
                                             jnp.asarray(t, jnp.float32)))
  want = np.zeros((3, 3))
  for k in range(3):
    for l in range(3):
      want[k, l] = np.mean([np.corrcoef(a[:, k, j], t[:, l, j])[0, 1] for j in range(4)])
  np.testing.assert_allclose(got, want, atol=1e-5)
