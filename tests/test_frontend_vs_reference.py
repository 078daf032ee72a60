"""The JAX log-mel front end against HF `ClapFeatureExtractor` (non-fusion) on real clips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import soxr
from transformers import ClapFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from data_pipelines import policy
from hade_jax import frontend

# float64 (HF's precision) must match to this many dB everywhere.
TOL_DB = 1e-3
# float32 rFFT noise sits ~130 dB under a frame's energy: bands within this many dB of their
# frame's loudest band must still match to TOL_DB; deeper bands only to FLOAT32_FLOOR_TOL_DB.
FLOAT32_RANGE_DB = 60.0
FLOAT32_FLOOR_TOL_DB = 0.05
MAX_LENGTH_S = 10  # HF max_length_s: the reference extractor's clip length.
# HF `padding` -> data_pipelines.policy pad mode.
PAD_MODES = {"repeatpad": "repeatpad", "repeat": "repeat", "pad": "zeros"}


def _num_samples(cfg: frontend.LogMelConfig) -> int:
  return MAX_LENGTH_S * cfg.sample_rate  # HF nb_max_samples


def _fit(wave, cfg, *, mode="repeatpad", crop_start=0):
  """HF's crop/pad policy through the project's one policy (data_pipelines.policy.fit_clip)."""
  return policy.fit_clip(wave, _num_samples(cfg), start=crop_start, pad_mode=PAD_MODES[mode])[0]


def _reference_extractor(cfg: frontend.LogMelConfig, padding: str = "repeatpad"):
  return ClapFeatureExtractor(
      feature_size=cfg.n_mels, sampling_rate=cfg.sample_rate, hop_length=cfg.hop_length,
      max_length_s=MAX_LENGTH_S, fft_window_size=cfg.n_fft, frequency_min=cfg.f_min,
      frequency_max=cfg.f_max, truncation="rand_trunc", padding=padding)


def _read_mono(path, sample_rate):
  wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
  wave = wave.mean(axis=1)
  if sr != sample_rate:
    wave = soxr.resample(wave, sr, sample_rate)
  return np.ascontiguousarray(wave, dtype=np.float32)


@functools.partial(jax.jit, static_argnums=1)
def _log_mel_f32(wave_BxS, cfg):
  return frontend.log_mel(wave_BxS, cfg)


def _compare_on_clips(waves, cfg):
  """HF applies its own crop/pad policy to each raw clip; we mirror it with policy.fit_clip."""
  fe = _reference_extractor(cfg)
  refs, fitted = [], []
  for i, wave in enumerate(waves):
    np.random.seed(i)
    ref = fe(wave, sampling_rate=cfg.sample_rate, return_tensors="np")["input_features"]
    refs.append(ref[0, 0])
    np.random.seed(i)
    overflow = wave.shape[0] - _num_samples(cfg)
    start = np.random.randint(0, overflow + 1) if overflow > 0 else 0
    fitted.append(_fit(wave, cfg, crop_start=start))
  ref_BxNxF = np.stack(refs)
  wave_BxS = np.stack(fitted)
  assert wave_BxS.shape == (len(waves), _num_samples(cfg))

  got64 = frontend.log_mel_x64(wave_BxS, cfg)
  num_frames = cfg.num_frames(_num_samples(cfg))
  assert got64.shape == ref_BxNxF.shape == (len(waves), num_frames, cfg.n_mels)
  err64 = np.abs(got64 - ref_BxNxF)
  assert err64.max() <= TOL_DB, f"float64 log-mel off by {err64.max()} dB"

  got32 = np.asarray(_log_mel_f32(jnp.asarray(wave_BxS), cfg))
  assert got32.dtype == np.float32
  err32 = np.abs(got32 - ref_BxNxF)
  loud = ref_BxNxF >= ref_BxNxF.max(axis=2, keepdims=True) - FLOAT32_RANGE_DB
  assert err32[loud].max() <= TOL_DB, f"float32 log-mel off by {err32[loud].max()} dB"
  assert err32.max() <= FLOAT32_FLOOR_TOL_DB, f"float32 log-mel off by {err32.max()} dB"
  return err64.max(), err32.max()


def test_filterbank_matches_hf():
  for sample_rate in (48000, 32000):
    for scale, norm in (("slaney", "slaney"), ("htk", None), ("kaldi", None), ("slaney", None),
                        ("htk", "slaney")):
      cfg = frontend.LogMelConfig(sample_rate=sample_rate, mel_scale=scale, mel_norm=norm)
      ref = mel_filter_bank(num_frequency_bins=cfg.n_freqs, num_mel_filters=cfg.n_mels,
                            min_frequency=cfg.f_min, max_frequency=cfg.f_max,
                            sampling_rate=sample_rate, norm=norm, mel_scale=scale)
      np.testing.assert_allclose(frontend.mel_filterbank(cfg), ref, rtol=1e-12, atol=1e-15)


def test_presets_and_from_hf():
  laion, wavcaps = frontend.LogMelConfig.laion_clap(), frontend.LogMelConfig.wavcaps()
  assert (laion.sample_rate, laion.hop_length, laion.n_fft, laion.n_mels) == (48000, 480, 1024, 64)
  assert (wavcaps.sample_rate, wavcaps.hop_length, wavcaps.n_fft) == (32000, 320, 1024)
  for cfg in (laion, wavcaps):
    assert frontend.LogMelConfig.from_hf(_reference_extractor(cfg).to_dict()) == cfg
  # HF's own defaults (frequency_min 0) come through when the dict leaves keys out.
  assert frontend.LogMelConfig.from_hf({}).f_min == 0.0


def test_laion_preset_on_real_clips(shared_data):
  cfg = frontend.LogMelConfig.laion_clap()
  paths = sorted((shared_data / "clotho_eval7" / "evaluation").glob("*.wav"))
  paths += sorted((shared_data / "audiocaps_test14" / "test").glob("*.wav"))
  assert len(paths) == 21
  # 44.1 kHz clips of 15-30 s (random crops), 22.05 kHz stereo and a 7.4 s clip (repeatpad).
  waves = [_read_mono(p, cfg.sample_rate) for p in paths]
  assert min(w.shape[0] for w in waves) < _num_samples(cfg) < max(w.shape[0] for w in waves)
  _compare_on_clips(waves, cfg)


def test_wavcaps_preset_on_real_flac(shared_data):
  cfg = frontend.LogMelConfig.wavcaps()
  paths = sorted((shared_data / "caption_eval21" / "audio_32k").glob("*/*.flac"))
  assert len(paths) == 21
  waves = [_read_mono(p, cfg.sample_rate) for p in paths]
  _compare_on_clips(waves, cfg)


@pytest.mark.parametrize("mode", ["repeatpad", "repeat", "pad"])
def test_fit_clip_short_clip_modes(shared_data, mode):
  cfg = frontend.LogMelConfig.laion_clap()
  wave = _read_mono(shared_data / "audiocaps_test14" / "test" / "6BJ455B1aAs_0.wav", 48000)
  assert wave.shape[0] < _num_samples(cfg)
  ref = _reference_extractor(cfg, padding=mode)(
      wave, sampling_rate=48000, return_tensors="np")["input_features"][:, 0]
  fitted = _fit(wave, cfg, mode=mode)
  assert fitted.shape == (_num_samples(cfg),)
  np.testing.assert_allclose(frontend.log_mel_x64(fitted[None], cfg), ref, rtol=0, atol=TOL_DB)


def test_fit_clip_crops():
  num_samples = 100  # 1 s at 100 Hz
  wave = np.arange(250, dtype=np.float32)
  fit = lambda w, start: policy.fit_clip(w, num_samples, start=start, pad_mode="repeatpad")[0]
  np.testing.assert_array_equal(fit(wave, 150), wave[150:])
  starts = {int(fit(wave, policy.crop_start(len(wave), num_samples, "random",
                                            np.random.default_rng(s)))[0]) for s in range(50)}
  assert starts <= set(range(151)) and len(starts) > 10
  with pytest.raises(ValueError, match="crop_start 151"):
    fit(wave, 151)
  np.testing.assert_array_equal(fit(wave[:100], 0), wave[:100])
