"""HtsatModel against a random-init HF `ClapAudioModel` (eval mode), imported from disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ClapAudioConfig, ClapAudioModel, ClapConfig, ClapFeatureExtractor

from hade_jax import frontend, htsat
from hade_jax.convert import common
from hade_jax.convert import htsat as convert_htsat
from tests import hf_reference

TOL = 1e-4
# 4 stages at 1/4 of tiny's grid: 512 frames x 32 mels -> 128 x 128 image, window 4.
SMALL = dict(spec_size=128, num_mel_bins=32, patch_embeds_hidden_size=16, hidden_size=128,
             depths=[2, 2, 2, 2], num_attention_heads=[2, 2, 4, 4], window_size=4)
# HTS-AT tiny's geometry (256 x 256 image from 1024 frames x 64 mels, window 8, depths
# 2/2/6/2), narrowed to width 16 to stay cheap on CPU.
TINY_NARROW = dict(patch_embeds_hidden_size=16, hidden_size=128)


def _reference(hf_kwargs, seed=0):
  """A ClapAudioModel in eval mode with every float tensor random (HF zero-inits some)."""
  torch.manual_seed(seed)
  return hf_reference.randomize_(ClapAudioModel(ClapAudioConfig(**hf_kwargs)), seed)


def _random_mel(batch, frames, mels, seed=0):
  # dB-like values around the batch norm's running mean.
  return (np.random.RandomState(seed).randn(batch, frames, mels) * 15.0 - 40.0).astype(np.float32)


def _jit_forward(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, mel_BxNxF):
    return nnx.merge(graphdef, state)(mel_BxNxF)

  return lambda mel: forward(state, jnp.asarray(mel))


def _assert_matches_reference(forward, ref_model, mel_BxNxF):
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(mel_BxNxF)[:, None], output_hidden_states=True)
  pooled, aux = forward(mel_BxNxF)
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(aux["last_hidden_state"]), ref.last_hidden_state.numpy(),
                             rtol=0, atol=TOL)
  assert len(aux["hidden_states"]) == len(ref.hidden_states)
  for i, (got, want) in enumerate(zip(aux["hidden_states"], ref.hidden_states, strict=True)):
    assert got.shape == tuple(want.shape), f"hidden_states[{i}]"
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=TOL,
                               err_msg=f"hidden_states[{i}]")
  # Stage-4 frames are HF's last_hidden_state averaged over its frequency rows: ties our
  # unfolding to HF's own time grouping.
  np.testing.assert_allclose(np.asarray(aux["frames"][-1]),
                             ref.last_hidden_state.numpy().mean(axis=2).transpose(0, 2, 1),
                             rtol=0, atol=TOL)
  return aux


@pytest.fixture(scope="module")
def small_ref():
  return _reference(SMALL)


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, small_ref):
  folder = tmp_path_factory.mktemp("clap_audio_safetensors")
  small_ref.save_pretrained(folder)
  assert (folder / "model.safetensors").is_file()
  ClapFeatureExtractor(feature_size=SMALL["num_mel_bins"], frequency_min=50,
                       truncation="rand_trunc").save_pretrained(folder)
  assert (folder / "preprocessor_config.json").is_file()
  return folder


def test_safetensors_folder_matches_reference(small_folder, small_ref):
  model, mel_cfg, report = convert_htsat.load_clap_audio(small_folder)
  assert mel_cfg == frontend.LogMelConfig(n_mels=32, f_min=50.0)
  assert not report.missing and not report.unused
  n_blocks = sum(SMALL["depths"])
  assert len(report.expected_unused) == n_blocks + 1  # relative_position_index + BN counter
  assert len(report.loaded) == len(nnx.to_flat_state(nnx.state(model)))
  forward = _jit_forward(model)
  aux = _assert_matches_reference(forward, small_ref, _random_mel(2, 512, 32))
  assert [f.shape for f in aux["frames"]] == [(2, 128, 16), (2, 64, 32), (2, 32, 64), (2, 16, 128)]
  # Fewer frames than the grid holds: HF's bicubic (align_corners) resize to 512 frames.
  _assert_matches_reference(forward, small_ref, _random_mel(2, 300, 32, seed=1))


def test_pytorch_bin_folder_matches_reference(tmp_path, small_folder, small_ref):
  (tmp_path / "config.json").write_text((small_folder / "config.json").read_text())
  torch.save(small_ref.state_dict(), tmp_path / "pytorch_model.bin")
  model, mel_cfg, report = convert_htsat.load_clap_audio(tmp_path)
  assert mel_cfg == frontend.LogMelConfig(n_mels=32)  # no preprocessor file: LAION preset
  assert not report.missing and not report.unused
  _assert_matches_reference(_jit_forward(model), small_ref, _random_mel(1, 511, 32, seed=2))


@pytest.mark.parametrize("hf_kwargs,frames,mels", [
    (TINY_NARROW, 1001, 64),  # LAION-CLAP's 10 s at 48 kHz: 1001 frames resized to 1024
    ({**SMALL, "num_mel_bins": 30}, 512, 30),  # 30 mels resized to the grid's 32
])
def test_other_geometries_match_reference(hf_kwargs, frames, mels):
  ref_model = _reference(hf_kwargs, seed=3)
  cfg = htsat.HtsatConfig.from_hf(ref_model.config.to_dict())
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(0))
  state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  report = convert_htsat.import_htsat(model, state)
  assert not report.unused
  aux = _assert_matches_reference(_jit_forward(model), ref_model, _random_mel(2, frames, mels))
  if hf_kwargs is TINY_NARROW:
    expected = [(2, 256, 16), (2, 128, 32), (2, 64, 64), (2, 32, 128)]
    assert [f.shape for f in aux["frames"]] == expected


def test_batch_norm_train_mode_matches_reference():
  """`model.train()`: batch statistics over (clips, frames) per mel bin, as torch in training."""
  ref_model = _reference({**SMALL, "hidden_dropout_prob": 0.0}, seed=5).train()
  bn = ref_model.audio_encoder.batch_norm
  old_var = bn.running_var.numpy().copy()
  cfg = htsat.HtsatConfig.from_hf(ref_model.config.to_dict())
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(0))
  convert_htsat.import_htsat(model, {k: v.numpy() for k, v in ref_model.state_dict().items()})
  model.train()
  mel = _random_mel(2, 512, 32, seed=5)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(mel)[:, None])
  pooled, _ = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(mel))
  np.testing.assert_allclose(np.asarray(pooled), ref.pooler_output.numpy(), rtol=0, atol=TOL)
  np.testing.assert_allclose(np.asarray(model.batch_norm.mean[...]), bn.running_mean.numpy(),
                             rtol=1e-6, atol=1e-5)
  # torch folds the unbiased batch variance into running_var, flax the biased one.
  n = mel.shape[0] * mel.shape[1]
  biased_share = (bn.running_var.numpy() - 0.9 * old_var) * (n - 1) / n
  np.testing.assert_allclose(np.asarray(model.batch_norm.var[...]), 0.9 * old_var + biased_share,
                             rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  mel = jnp.asarray(_random_mel(2, 512, 32))
  outputs = []
  for dtype in (jnp.float32, jnp.bfloat16):
    model = htsat.HtsatModel(htsat.HtsatConfig.small_test(dtype=dtype), rngs=nnx.Rngs(0))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    pooled, aux = _jit_forward(model)(mel)
    assert pooled.dtype == jnp.float32 and aux["hidden_states"][1].dtype == dtype
    outputs.append(np.asarray(pooled))
  assert np.abs(outputs[1] - outputs[0]).max() < 0.05 * np.abs(outputs[0]).max()


def test_clap_model_checkpoint(small_ref):
  """A ClapModel state dict: prefix detected, text-tower keys not reported as unused."""
  clap_cfg = ClapConfig(audio_config=ClapAudioConfig(**SMALL).to_dict(),
                        text_config={"num_hidden_layers": 1, "hidden_size": 32,
                                     "num_attention_heads": 2, "intermediate_size": 64})
  cfg = htsat.HtsatConfig.from_hf(clap_cfg.to_dict())
  assert cfg == htsat.HtsatConfig.from_hf(small_ref.config.to_dict())
  state = {"audio_model." + k: v.numpy() for k, v in small_ref.state_dict().items()}
  state["text_model.embeddings.word_embeddings.weight"] = np.zeros((4, 32), np.float32)
  state["audio_projection.linear1.weight"] = np.zeros((8, 128), np.float32)
  assert convert_htsat.detect_prefix(state) == "audio_model.audio_encoder."
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(0))
  report = convert_htsat.import_htsat(model, state)
  assert not report.missing and not report.unused
  _assert_matches_reference(_jit_forward(model), small_ref, _random_mel(1, 512, 32, seed=4))


def test_import_errors(small_ref):
  cfg = htsat.HtsatConfig.from_hf(small_ref.config.to_dict())
  state = {k: v.numpy() for k, v in small_ref.state_dict().items()}
  bad_key = "audio_encoder.layers.1.blocks.0.attention.self.query.weight"
  wrong_shape = dict(state, **{bad_key: np.zeros((3, 32), np.float32)})
  with pytest.raises(common.ConversionError, match=bad_key.replace(".", r"\.")):
    convert_htsat.import_htsat(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)), wrong_shape)

  missing_key = "audio_encoder.layers.2.downsample.reduction.weight"
  partial = {k: v for k, v in state.items() if k != missing_key}
  with pytest.raises(common.ConversionError, match=missing_key.replace(".", r"\.")):
    convert_htsat.import_htsat(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)), partial)
  report = convert_htsat.import_htsat(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)), partial,
                                      strict=False)
  assert report.missing == [f"layers/2/downsample/reduction/kernel (expected {missing_key})"]

  with pytest.raises(common.ConversionError, match="no HTS-AT tower"):
    convert_htsat.import_htsat(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)), {"bert.x": np.zeros(1)})
  with pytest.raises(ValueError, match="enable_fusion"):
    htsat.HtsatConfig.from_hf({**small_ref.config.to_dict(), "enable_fusion": True})


def test_stage_frames_are_in_time_order():
  """Frame n of stage h depends on exactly the input frames [n*s, (n+1)*s), s = N / T_h.

  With every attention branch zeroed, tokens only mix through 2x2 patch merging, so the
  Jacobian of each stage's frames w.r.t. the log-mel frames is block diagonal iff the wav->image
  fold and its undoing keep time order (chunks, rows and columns all in the right places).
  """
  cfg = htsat.HtsatConfig.small_test()
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(0))
  for stage in model.layers:
    for block in stage.blocks:
      dense = block.attention.output.dense
      dense.kernel[...] = jnp.zeros_like(dense.kernel[...])
      dense.bias[...] = jnp.ones_like(dense.bias[...])
  graphdef, state = nnx.split(model)
  mel_NxF = jnp.asarray(_random_mel(1, cfg.num_frames, cfg.num_mel_bins)[0])
  direction_F = jnp.linspace(1.0, 2.0, cfg.num_mel_bins)

  def frame_scores(shift_N):
    _, aux = nnx.merge(graphdef, state)((mel_NxF + shift_N[:, None] * direction_F)[None])
    return [f[0] @ jnp.linspace(1.0, 2.0, f.shape[-1]) for f in aux["frames"]]

  # Forward mode: jit(vmap(vjp)) (jacrev) miscompiles on XLA CPU in jax 0.10.2.
  jacobians = jax.jit(jax.jacfwd(frame_scores))(jnp.zeros(cfg.num_frames))
  for h, jac_TxN in enumerate(jacobians):
    support_TxN = np.asarray(jac_TxN) != 0
    t, n = support_TxN.shape
    assert t == cfg.num_frames // (4 * 2**h)
    expected_TxN = np.arange(n)[None, :] // (n // t) == np.arange(t)[:, None]
    np.testing.assert_array_equal(support_TxN, expected_TxN, err_msg=f"stage {h + 1}")


def test_dropout_only_with_rngs():
  cfg = htsat.HtsatConfig.small_test(drop_path_rate=0.2)
  graphdef, state = nnx.split(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)))

  @jax.jit
  def forward(state, mel_BxNxF, key):
    model = nnx.merge(graphdef, state)
    return model(mel_BxNxF)[0], model(mel_BxNxF, rngs=nnx.Rngs(dropout=key))[0]

  mel = jnp.asarray(_random_mel(2, 512, 32))
  eval_a, train_a = forward(state, mel, jax.random.key(1))
  eval_b, train_b = forward(state, mel, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  assert np.abs(np.asarray(train_a) - np.asarray(eval_a)).max() > 1e-3
  assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3


def test_config_presets_and_validation():
  tiny = htsat.HtsatConfig.tiny()
  assert tiny == htsat.HtsatConfig.from_hf(ClapAudioConfig().to_dict())
  assert (tiny.freq_ratio, tiny.num_frames, tiny.stage_resolutions[-1]) == (4, 1024, (8, 8))
  assert tiny.stage_widths == (96, 192, 384, 768) and tiny.num_features == 768
  with pytest.raises(ValueError, match="smaller than window_size"):
    htsat.HtsatConfig.small_test(window_size=8)
  model = htsat.HtsatModel(htsat.HtsatConfig.small_test(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds"):
    model(jnp.zeros((1, 513, 32)))
