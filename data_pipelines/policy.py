"""The data facts every other module asks for, and the one crop/pad policy (numpy, no JAX).

Facts: the datasets a config may name, the stored sample rate of each builder config name,
the synthcaps sizes, the pad modes and evaluation crops. The policy: `crop_start` says where a
clip's crop starts, `fit_clip` cuts or pads it to the crop length. Training (random starts),
the TFDS evaluation pipeline (head / center / windows), the API (one crop per clip) and the
front end's HF parity tests all call `fit_clip`. Long clips by windows: `window_starts` says
where each window starts, `fit_windows` cuts them (evaluation, the API and the search index).
"""

from __future__ import annotations

import re

import numpy as np

DATASETS = ("clotho", "audiocaps", "synthcaps", "folder")
# Builder config name -> stored sample rate. Names may carry a suffix ('48k_v2'), a synthcaps
# size prefix ('demo_16k') or be an explicit rate ('custom1a2b3c4d_8000hz').
RATES = {"16k": 16_000, "22k": 22_050, "32k": 32_000, "44k": 44_100, "48k": 48_000}
# synthcaps size name -> (clips per split, clip seconds).
SYNTH_SIZES = {
    "tiny": ({"train": 12, "validation": 6, "test": 6}, 4.0),
    "demo": ({"train": 960, "validation": 160, "test": 160}, 10.0),
    "full": ({"train": 9600, "validation": 1040, "test": 1040}, 10.0),
}
# Clips shorter than the crop: 'zeros' pads at the end (HF 'pad'), 'repeat' tiles the clip
# past the end and cuts, 'repeatpad' tiles it a whole number of times then pads (HF default).
PAD_MODES = ("zeros", "repeat", "repeatpad")
# Clips longer than the crop at evaluation: the first ('head') or middle ('center') samples,
# or windows every `hop` samples covering the whole clip, each encoded, their features pooled
# per clip (`retrieval.pool_windows`; docs/method.md "Long audio").
EVAL_CROPS = ("head", "center", "windows")


def rate_name(rate: int) -> str:
  """16000 -> '16k'; a rate without a builder config name -> '<rate>hz'."""
  return next((name for name, r in RATES.items() if r == rate), f"{rate}hz")


def builder_rate(name: str) -> int | None:
  """Sample rate of a builder config name: '48k', '48k_v2', 'demo_16k', '8000hz' -> Hz."""
  for part in name.split("_"):
    if part in RATES:
      return RATES[part]
    if m := re.fullmatch(r"([1-9][0-9]*)hz", part):
      return int(m.group(1))
  return None


def check_crop_policy(crop: str, pad_mode: str) -> None:
  """Raises ValueError unless (crop, pad_mode) is a known evaluation crop and pad mode."""
  if crop not in EVAL_CROPS:
    raise ValueError(f"config.data.eval_crop={crop!r}: expected one of "
                     f"{', '.join(map(repr, EVAL_CROPS))}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"config.data.pad_mode={pad_mode!r}: expected one of "
                     f"{', '.join(map(repr, PAD_MODES))}")


def crop_start(length: int, num_samples: int, crop: str = "head",
               rng: np.random.Generator | None = None) -> int:
  """First sample of the crop of a `length`-sample clip: 'head', 'center' or 'random' (rng)."""
  overflow = max(length - num_samples, 0)
  if crop == "head" or overflow == 0:
    return 0
  if crop == "center":
    return overflow // 2
  if crop == "random":
    return int(rng.integers(0, overflow + 1))
  raise ValueError(f"unknown crop {crop!r}; use 'head', 'center' or 'random'")


def fit_clip(wave_L: np.ndarray, num_samples: int, *, start: int = 0,
             pad_mode: str = "zeros") -> tuple[np.ndarray, int]:
  """One clip cut or padded to `num_samples`: (wave [S] in the input's dtype, valid samples).

  Longer clips: samples [start, start + S), start in [0, L - S] (`crop_start`). Shorter clips
  are padded by `pad_mode` (PAD_MODES). `valid` counts the samples that are not zero padding.

  Raises:
    ValueError: a start outside the clip, an unknown pad mode, or a waveform that is not 1-D.
  """
  wave_L = np.asarray(wave_L)
  if wave_L.ndim != 1:
    raise ValueError(f"fit_clip expects a mono [samples] waveform, got shape {wave_L.shape}")
  if pad_mode not in PAD_MODES:
    raise ValueError(f"unknown pad mode {pad_mode!r}; use one of {', '.join(PAD_MODES)}")
  length = len(wave_L)
  if not 0 <= start <= max(length - num_samples, 0):
    raise ValueError(f"crop_start {start} outside [0, {max(length - num_samples, 0)}] for a "
                     f"clip of {length} samples")
  x = wave_L[start:start + num_samples]
  n = len(x)
  if n == num_samples:
    return x, n
  if n > 0 and pad_mode == "repeat":
    return np.tile(x, -(-num_samples // n))[:num_samples], num_samples
  if n > 0 and pad_mode == "repeatpad":
    x = np.tile(x, num_samples // n)
    n = len(x)
  out = np.zeros(num_samples, x.dtype)
  out[:n] = x
  return out, n


def hop_samples(num_samples: int, hop_seconds: float, sample_rate: int) -> int:
  """Samples between window starts: `hop_seconds` at `sample_rate`, 0 = the crop (no overlap).

  Raises:
    ValueError: a negative hop, or one longer than the crop (it would skip audio).
  """
  if hop_seconds < 0:
    raise ValueError(f"config.data.window_hop_seconds={hop_seconds}: must be >= 0 "
                     "(0 = the crop length)")
  hop = num_samples if hop_seconds == 0 else int(round(hop_seconds * sample_rate))
  if not 0 < hop <= num_samples:
    raise ValueError(f"config.data.window_hop_seconds={hop_seconds}: {hop} samples at "
                     f"{sample_rate} Hz; must be more than 0 and at most the crop "
                     f"({num_samples} samples), or windows would skip audio")
  return hop


def window_starts(length: int, num_samples: int, hop: int,
                  max_windows: int | None = None) -> list[int]:
  """First samples of the windows of a `length`-sample clip: 0, hop, 2 hop, ... and the last
  window aligned to the clip's end (L - S), so every window is whole audio (none is padded)
  and every sample is covered. A clip no longer than the crop has one window at 0: exactly
  the 'head' crop (padded by `fit_clip`). `max_windows` keeps the first ones (None = all).
  """
  if length <= num_samples:
    return [0]
  last = length - num_samples
  starts = list(range(0, last, hop)) + [last]
  return starts[:max_windows] if max_windows else starts


def fit_windows(wave_L: np.ndarray, num_samples: int, hop: int, *,
                pad_mode: str = "zeros") -> np.ndarray:
  """A clip as its windows [W, S] (`window_starts`); a short clip is one padded crop [1, S]."""
  wave_L = np.asarray(wave_L)
  starts = window_starts(len(wave_L), num_samples, hop)
  return np.stack([fit_clip(wave_L, num_samples, start=s, pad_mode=pad_mode)[0]
                   for s in starts])
