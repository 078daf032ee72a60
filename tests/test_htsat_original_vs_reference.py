"""The original HTS-AT AudioSet checkpoint (a Lightning `.ckpt`, keys under `sed_model.`)
imported with `convert.original.load_htsat_audioset` equals the original model.

The reference is LAION-CLAP's copy of the original HTS-AT code (`laion_clap.clap_module.htsat`,
the same module names as Chen et al.'s), small and random, saved in the Lightning layout.
"""

import argparse
import dataclasses
import re
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from hade_jax import frontend, htsat
from hade_jax.convert import common, original, torch_ckpt
from tests import original_reference

TOL = 1e-4
# A small front end for the small model: 512 frames of 32 mels from 5.1 s at 16 kHz.
MEL = frontend.LogMelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=32,
                            f_min=50.0, f_max=8000.0)
AUDIO_CFG = types.SimpleNamespace(mel_bins=32, sample_rate=16000, window_size=512, hop_size=160,
                                  fmin=50, fmax=8000)
SAMPLES = 511 * 160  # 512 frames


@pytest.fixture(scope="module")
def reference():
  htsat_module, _ = original_reference.laion_clap_modules()
  torch.manual_seed(0)
  return original_reference.randomize_(original_reference.small_htsat(htsat_module, AUDIO_CFG))


def _lightning_ckpt(ref, path, **extra):
  state = {"sed_model." + k: v for k, v in ref.state_dict().items()}
  torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.5.9",
              "state_dict": state, "optimizer_states": [{"state": {}, "param_groups": []}],
              "lr_schedulers": [], **extra}, path)
  return path


@pytest.fixture(scope="module")
def ckpt_path(reference, tmp_path_factory):
  folder = tmp_path_factory.mktemp("htsat")
  return _lightning_ckpt(reference, folder / "HTSAT_AudioSet_Saved_1.ckpt")


def _waves(seed, samples=SAMPLES, batch=2):
  return (0.3 * np.random.RandomState(seed).randn(batch, samples)).astype(np.float32)


def _reference_run(ref, wave):
  """The original forward from waveforms: its own log-mel, stage tokens and outputs."""
  with torch.no_grad():
    w = torch.from_numpy(wave)
    mel = ref.logmel_extractor(ref.spectrogram_extractor(w))[:, 0]  # [B, N, F]
    out, captured = original_reference.stage_outputs(ref, lambda: ref({"waveform": w}))
  return mel.numpy(), out, captured


def test_original_htsat_ckpt_imports_exactly(reference, ckpt_path):
  model, mel_cfg, report = original.load_htsat_audioset(ckpt_path, mel=MEL)
  assert mel_cfg == MEL
  cfg = model.cfg
  assert (cfg.spec_size, cfg.num_mel_bins, cfg.window_size) == (128, 32, 4)
  assert cfg.depths == (2, 1, 2, 1) and cfg.num_attention_heads == (2, 2, 4, 4)
  assert cfg.stage_widths == (16, 32, 64, 128)
  assert not report.missing and not report.unused, str(report)
  n_params = len(nnx.to_flat_state(nnx.state(model)))
  # qkv weight and bias are one original tensor each for three hade_jax ones.
  assert len(report.loaded) == n_params - 4 * sum(cfg.depths)
  assert all(k.startswith("sed_model.") for k in report.loaded)
  for key in ("sed_model.tscam_conv.weight", "sed_model.head.bias",
              "sed_model.logmel_extractor.melW", "sed_model.layers.0.blocks.1.attn_mask",
              "sed_model.bn0.num_batches_tracked"):
    assert key in report.expected_unused

  forward = jax.jit(lambda m: model(m))
  wave = _waves(0)
  ref_mel, ref_out, captured = _reference_run(reference, wave)
  pooled, aux = forward(ref_mel)
  original_reference.assert_stages_match(pooled, aux, captured, ref_out, TOL)
  # The whole chain from the waveform, with hade_jax's own front end.
  pooled, _ = forward(frontend.log_mel(wave, MEL))
  np.testing.assert_allclose(pooled, ref_out["embedding"].numpy(), atol=TOL, rtol=0)


def test_front_end_matches_the_original(reference):
  """hade_jax's log-mel equals the original torchlibrosa front end (the file stores it)."""
  wave = _waves(2)
  ref_mel, _, _ = _reference_run(reference, wave)
  np.testing.assert_allclose(frontend.log_mel(wave, MEL), ref_mel, atol=TOL, rtol=0)
  # A loud tone over faint noise: torchlibrosa's float32 DFT-by-convolution rounds the quiet
  # bands by ~1e-4 dB (hade_jax's float64 path does not change that: the reference is off).
  t = np.arange(SAMPLES) / MEL.sample_rate
  tone = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.RandomState(0).randn(SAMPLES)
  ref_mel, _, _ = _reference_run(reference, tone[None].astype(np.float32))
  np.testing.assert_allclose(frontend.log_mel(tone[None].astype(np.float32), MEL), ref_mel,
                             atol=3e-4, rtol=0)


def test_safetensors_and_refusals(reference, ckpt_path, tmp_path):
  model_a, _, _ = original.load_htsat_audioset(ckpt_path, mel=MEL)
  tensors = torch_ckpt.read(ckpt_path).tensors
  st_path = tmp_path / "htsat.safetensors"
  save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, st_path)
  model_b, _, report = original.load_htsat_audioset(st_path, mel=MEL)
  assert not report.missing and not report.unused
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model_a)),
                               nnx.to_flat_state(nnx.state(model_b)), strict=True):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                  err_msg=str(path))

  # A pickle holding an object (here an argparse Namespace of hyper-parameters) is refused.
  unsafe = _lightning_ckpt(reference, tmp_path / "unsafe.ckpt",
                           hyper_parameters=argparse.Namespace(lr=1e-3))
  with pytest.raises(common.ConversionError, match=r"weights_only=True.*\n.*If you trust"):
    torch_ckpt.read(unsafe)
  # The front end must be the one the file was trained with (its stored filterbank).
  with pytest.raises(common.ConversionError, match="mel filterbank"):
    original.load_htsat_audioset(ckpt_path, mel=dataclasses.replace(MEL, sample_rate=32000))
  # Import errors name the keys as the file does.
  cfg = original.htsat_config_from_state_dict(tensors, "sed_model.")
  gone = "sed_model.layers.1.blocks.0.attn.qkv.weight"
  with pytest.raises(common.ConversionError, match=re.escape(gone)):
    original.import_htsat_original(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)),
                                   {k: v for k, v in tensors.items() if k != gone},
                                   prefix="sed_model.")
  bad = "sed_model.layers.0.blocks.1.mlp.fc2.weight"
  with pytest.raises(common.ConversionError, match=re.escape(bad) + r" \(16, 63\)"):
    original.import_htsat_original(htsat.HtsatModel(cfg, rngs=nnx.Rngs(0)),
                                   dict(tensors, **{bad: np.zeros((16, 63), np.float32)}),
                                   prefix="sed_model.")
  with pytest.raises(common.ConversionError, match="no original HTS-AT tower"):
    original.htsat_config_from_state_dict({"x.weight": np.zeros(2)}, "sed_model.")
