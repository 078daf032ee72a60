"""Log-mel front end of the HTS-AT audio tower, equal to HF `ClapFeatureExtractor` (non-fusion).

HF computes, per clip: centre-padding by n_fft/2 (reflect), frames every `hop_length` samples,
a periodic Hann window, rFFT (in float64, stored as complex64), |X|^2, a mel filterbank,
max(1e-10, .), then 10*log10(max(amin, .) / ref) with no top_db clipping (its `top_db`
attribute is never passed on), cast to float32. For the non-fusion ('rand_trunc') path the
filterbank is the librosa one (slaney mel scale, slaney area norm); the htk/no-norm bank is
only used on the fusion path, which hade_jax does not implement.

`log_mel` runs in float32 by default. rFFT rounding in float32 sits ~130 dB under a frame's
energy, so mel bands far below the loudest band of their frame (e.g. the empty band above
the Nyquist of a 22.05 kHz clip resampled to 48 kHz) drift by up to ~0.015 dB, while bands
within 60 dB of their frame's peak stay within ~3e-4 dB of HF. `log_mel_x64` computes in
float64 as HF does and reproduces HF's float32 output exactly on the real test clips.

Legend: B: clips, S: samples, N: frames, K: FFT bins (n_fft/2 + 1), F: mel bins, W: n_fft.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hade_jax import fields

# Keys that configs saved before #12 hold in model.mel (HF's crop policy, now config.data's):
# dropped when such a config is read, so existing checkpoints keep loading.
RETIRED_KEYS = ("max_length_s", "padding")


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
  """Log-mel spectrogram (field names follow torchaudio/librosa).

  The clip length is `config.data.crop_seconds` and the crop/pad policy is
  `data_pipelines.policy` (HF's `max_length_s` / `padding` are not model fields).
  """

  sample_rate: int = 48000  # Hz the waveform must already be at (HF: sampling_rate).
  n_fft: int = 1024  # frame = window = FFT length (HF: fft_window_size).
  hop_length: int = 480  # samples between frames; 10 ms at 48 kHz.
  n_mels: int = 64  # mel bins (HF: feature_size).
  f_min: float = 50.0  # lowest filter edge, Hz (HF: frequency_min; LAION-CLAP uses 50).
  f_max: float = 14000.0  # highest filter edge, Hz (HF: frequency_max).
  mel_scale: str = "slaney"  # 'slaney' (librosa, non-fusion path), 'htk' or 'kaldi'.
  mel_norm: str | None = "slaney"  # 'slaney' area normalisation, or None (fusion path's bank).
  center: bool = True  # pad n_fft/2 on both sides so frame n is centred on sample n*hop.
  pad_mode: str = "reflect"  # numpy/jnp pad mode for the centre padding.
  mel_floor: float = 1e-10  # max(mel_floor, mel) before the log (HF spectrogram's default).
  amin: float = 1e-10  # power_to_db clamp (HF min_value).
  ref: float = 1.0  # power_to_db reference: 0 dB.
  top_db: float | None = None  # dynamic-range clip below each clip's max; HF never applies it.

  def __post_init__(self):
    p = fields.Problems(self)
    p.types()
    for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
      p.at_least(name, 1)
    for name in ("mel_floor", "amin", "ref"):
      p.positive(name)
    p.choice("mel_scale", ("slaney", "htk", "kaldi"))
    p.choice("mel_norm", (None, "slaney"))
    if p.items:
      p.raise_any()
    if not 0 <= self.f_min <= self.f_max <= self.sample_rate / 2:
      p.add("f_max", f"need 0 <= f_min <= f_max <= sample_rate/2, got {self.f_min}, "
            f"{self.f_max}, {self.sample_rate}")
    # The filterbank is [n_fft / 2 + 1, n_mels] float64, built on the host.
    p.param_bytes(2 * self.n_freqs * self.n_mels, ("n_fft", "n_mels"))
    p.raise_any()

  @property
  def n_freqs(self) -> int:
    return self.n_fft // 2 + 1

  def num_frames(self, num_samples: int) -> int:
    """Frames `log_mel` returns for a waveform of `num_samples` samples."""
    padded = num_samples + (2 * (self.n_fft // 2) if self.center else 0)
    return 1 + (padded - self.n_fft) // self.hop_length

  @classmethod
  def laion_clap(cls) -> LogMelConfig:
    """LAION-CLAP HTS-AT (HF `laion/clap-htsat-unfused`): 48 kHz, hop 480, 1001 frames / 10 s."""
    return cls()

  @classmethod
  def wavcaps(cls) -> LogMelConfig:
    """WavCaps HTS-AT: 32 kHz, n_fft 1024, hop 320, 64 mels, 50-14000 Hz, 10 s clips."""
    return cls(sample_rate=32000, hop_length=320)

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> LogMelConfig:
    """From a `ClapFeatureExtractor` dict (`preprocessor_config.json` or `.to_dict()`).

    The filterbank is always the non-fusion one (slaney/slaney): a `truncation: fusion` entry
    is ignored, as hade_jax's HTS-AT has no fusion branch.
    """
    if d.get("feature_extractor_type", "ClapFeatureExtractor") != "ClapFeatureExtractor":
      raise ValueError(f"expected a ClapFeatureExtractor config, got {d['feature_extractor_type']}")
    # HF's constructor defaults, used for keys the dict leaves out. Numbers pass as they are
    # (no int("64")): __post_init__ names a field of the wrong type.
    def get(key, default):
      value = d.get(key, default)
      return float(value) if isinstance(default, float) and fields.is_real(value) else value

    return cls(
        sample_rate=get("sampling_rate", 48000),
        n_fft=get("fft_window_size", 1024),
        hop_length=get("hop_length", 480),
        n_mels=get("feature_size", 64),
        f_min=get("frequency_min", 0.0),
        f_max=get("frequency_max", 14000.0),
    )


# ---------------------------------------------------------------------------------------------
# Filterbank and window (numpy float64, as HF builds them).


def hz_to_mel(freq: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
  """Hertz -> mels on the htk, kaldi or slaney (linear below 1 kHz, log above) scale."""
  freq = np.asarray(freq, dtype=np.float64)
  if mel_scale == "htk":
    return 2595.0 * np.log10(1.0 + freq / 700.0)
  if mel_scale == "kaldi":
    return 1127.0 * np.log(1.0 + freq / 700.0)
  # Slaney: 3 mels per 200 Hz up to 1 kHz (15 mels), then 27 mels per factor 6.4.
  linear = 3.0 * freq / 200.0
  log = 15.0 + np.log(np.maximum(freq, 1e-300) / 1000.0) * (27.0 / np.log(6.4))
  return np.where(freq >= 1000.0, log, linear)


def mel_to_hz(mels: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  mels = np.asarray(mels, dtype=np.float64)
  if mel_scale == "htk":
    return 700.0 * (np.power(10.0, mels / 2595.0) - 1.0)
  if mel_scale == "kaldi":
    return 700.0 * (np.exp(mels / 1127.0) - 1.0)
  linear = 200.0 * mels / 3.0
  log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0))
  return np.where(mels >= 15.0, log, linear)


@functools.lru_cache(maxsize=16)
def _mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sample_rate: int,
                 mel_norm: str | None, mel_scale: str) -> np.ndarray:
  centres_mel = np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2)
  centres_hz = mel_to_hz(centres_mel, mel_scale)
  # HF places the FFT bins with an integer Nyquist (sample_rate // 2).
  bins_hz = np.linspace(0, sample_rate // 2, n_freqs)
  gaps = np.diff(centres_hz)
  offsets_KxF2 = centres_hz[None, :] - bins_hz[:, None]
  rising_KxF = -offsets_KxF2[:, :-2] / gaps[:-1]
  falling_KxF = offsets_KxF2[:, 2:] / gaps[1:]
  fb_KxF = np.maximum(0.0, np.minimum(rising_KxF, falling_KxF))
  if mel_norm == "slaney":
    # Equal area per filter: scale by 2 / bandwidth.
    fb_KxF = fb_KxF * (2.0 / (centres_hz[2:] - centres_hz[:-2]))[None, :]
  fb_KxF.setflags(write=False)
  return fb_KxF


def mel_filterbank(cfg: LogMelConfig) -> np.ndarray:
  """[n_fft/2+1, n_mels] float64, equal to `transformers.audio_utils.mel_filter_bank`."""
  return _mel_filters(cfg.n_freqs, cfg.n_mels, float(cfg.f_min), float(cfg.f_max),
                      int(cfg.sample_rate), cfg.mel_norm, cfg.mel_scale)


def hann_window(n: int) -> np.ndarray:
  """Periodic Hann window of length n (float64), as HF's `window_function(n, 'hann')`."""
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


# ---------------------------------------------------------------------------------------------
# Log-mel in JAX.


def _frame_index(num_samples: int, cfg: LogMelConfig) -> np.ndarray:
  """[N, W] sample index of every frame in the (centre-padded) waveform."""
  n = cfg.num_frames(num_samples)
  return cfg.hop_length * np.arange(n)[:, None] + np.arange(cfg.n_fft)[None, :]


def log_mel(wave_BxS: jax.Array, cfg: LogMelConfig) -> jax.Array:
  """Log-mel spectrogram in dB, as `ClapFeatureExtractor(...).input_features[:, 0]`.

  Args:
    wave_BxS: mono waveforms at `cfg.sample_rate`, already cut to length
      (`data_pipelines.policy.fit_clip`).
      Computed in the array's float dtype: float32, or float64 under `jax.enable_x64`.
    cfg: the front-end configuration.

  Returns:
    mel_BxNxF in dB (same dtype as the computation), N = 1 + S // hop_length when centred.
  """
  wave_BxS = jnp.asarray(wave_BxS)
  if wave_BxS.ndim != 2:
    raise ValueError(f"log_mel expects [batch, samples], got shape {wave_BxS.shape}")
  if not jnp.issubdtype(wave_BxS.dtype, jnp.floating):
    wave_BxS = wave_BxS.astype(jnp.float32)
  dtype = wave_BxS.dtype
  index_NxW = _frame_index(wave_BxS.shape[1], cfg)
  if cfg.center:
    half = cfg.n_fft // 2
    wave_BxS = jnp.pad(wave_BxS, ((0, 0), (half, half)), mode=cfg.pad_mode)
  frames_BxNxW = wave_BxS[:, index_NxW] * jnp.asarray(hann_window(cfg.n_fft), dtype)
  spec_BxNxK = jnp.fft.rfft(frames_BxNxW, axis=-1)
  if dtype == jnp.float64:
    # HF stores the float64 FFT in a complex64 buffer before taking |X|^2 in float64.
    spec_BxNxK = spec_BxNxK.astype(jnp.complex64).astype(jnp.complex128)
  power_BxNxK = jnp.real(spec_BxNxK) ** 2 + jnp.imag(spec_BxNxK) ** 2
  fb_KxF = jnp.asarray(mel_filterbank(cfg), dtype)
  mel_BxNxF = jnp.einsum("bnk,kf->bnf", power_BxNxK, fb_KxF, precision=jax.lax.Precision.HIGHEST)
  mel_BxNxF = jnp.maximum(mel_BxNxF, cfg.mel_floor)
  ref = max(cfg.amin, cfg.ref)
  db_BxNxF = 10.0 * (jnp.log10(jnp.maximum(mel_BxNxF, cfg.amin)) - math.log10(ref))
  if cfg.top_db is not None:
    peak_Bx1x1 = jnp.max(db_BxNxF, axis=(1, 2), keepdims=True)
    db_BxNxF = jnp.maximum(db_BxNxF, peak_Bx1x1 - cfg.top_db)
  return db_BxNxF


@functools.partial(jax.jit, static_argnums=1)
def _log_mel_jit(wave_BxS: jax.Array, cfg: LogMelConfig) -> jax.Array:
  return log_mel(wave_BxS, cfg)


def log_mel_x64(wave_BxS: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
  """`log_mel` computed in float64 (HF's precision), returned as float32 numpy.

  Use it for offline feature extraction or reference checks; it enables x64 only inside.
  """
  with jax.enable_x64(True):
    wave = jnp.asarray(np.asarray(wave_BxS, dtype=np.float64))
    return np.asarray(_log_mel_jit(wave, cfg), dtype=np.float32)
