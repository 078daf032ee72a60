"""Audio decoding for dataset preparation: any file soundfile reads -> mono int16 at one rate.

What happens to each kind of input (the bad-input policy of the prepare step):

| input                                  | outcome                                              |
|----------------------------------------|------------------------------------------------------|
| mono 16-bit PCM at the target rate     | stored bit-exact                                     |
| any other rate from 1 kHz up           | resampled with soxr (quality `HQ`); length =         |
|                                        | frames * target / source rate (+-1)                  |
| a rate below 1 kHz (a damaged header:  | `AudioError('unsupported_rate')`: clip skipped and   |
| 1 Hz would turn each frame into 16,000)| reported                                             |
| stereo or multi-channel                | downmixed to the mean of the channels                |
| 24/32-bit or float samples             | converted; float peaks above full scale attenuated   |
|                                        | to full scale (not clipped)                          |
| truncated WAV (header longer than data)| the samples present are kept; reported as a note     |
| truncated FLAC (or other compressed)   | `AudioError('unreadable')` (libsndfile stops there)  |
| zero frames, or too few to survive     | `AudioError('empty')`: clip skipped and reported     |
| resampling to the target rate          |                                                      |
| NaN or Inf samples                     | `AudioError('non_finite')`: clip skipped and reported|
| not an audio file / corrupt header     | `AudioError('unreadable')`: clip skipped and reported|
| no such file                           | `AudioError('missing')`: names the file              |

In strict mode the prepare step turns every `AudioError` into a failure naming the file.
Whatever the bytes of the file, `decode` returns a `DecodedAudio` (int16, 1-D, at the target
rate) or raises `AudioError` naming the file; no decoder or resampler error escapes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import struct

import numpy as np
import soundfile
import soxr

from data_pipelines import policy

# File name endings that are treated as audio when a folder is listed.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".w64", ".rf64")

_INT16_SCALE = 32768.0  # soundfile maps PCM16 to float as int / 32768.
# Lowest source rate accepted. Real recordings are stored at 8 kHz or more; a header claiming a
# few Hz is damage, and resampling it would inflate every frame to thousands of samples.
MIN_SOURCE_RATE = 1_000


class AudioError(ValueError):
  """An audio file that cannot be used.

  Attributes:
    path: the file.
    reason: a short tag: 'missing', 'unreadable', 'empty', 'non_finite' or
      'unsupported_rate'.
    detail: what exactly was wrong.
  """

  def __init__(self, path: os.PathLike | str, reason: str, detail: str):
    super().__init__(f"{path}: {reason}: {detail}")
    self.path = str(path)
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
  """A decoded clip and what was done to it.

  Attributes:
    samples: int16 [S] mono waveform at `sample_rate`.
    sample_rate: the target rate.
    source_rate: the file's rate.
    source_channels: the file's channel count.
    notes: tags of what was done ('downmixed', 'resampled', 'attenuated', 'truncated').
  """

  samples: np.ndarray
  sample_rate: int
  source_rate: int
  source_channels: int
  notes: tuple[str, ...] = ()

  @property
  def seconds(self) -> float:
    return len(self.samples) / self.sample_rate


def wav_truncation(path: os.PathLike | str) -> str | None:
  """Says whether a RIFF/WAVE file holds fewer data bytes than its header declares.

  libsndfile silently returns the frames present in a truncated WAV, so this is the only
  place the damage becomes visible. Returns a description, or None when the file is whole
  or is not a RIFF/WAVE file.
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
      return None
    offset = 12
    while offset + 8 <= size:
      f.seek(offset)
      chunk = f.read(8)
      if len(chunk) < 8:
        return None
      chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
      if chunk_id == b"data":
        present = size - offset - 8
        # 0xFFFFFFFF is the "unknown size" marker written by streaming encoders.
        if chunk_size != 0xFFFFFFFF and present < chunk_size:
          return f"data chunk declares {chunk_size} bytes, file holds {present}"
        return None
      offset += 8 + chunk_size + (chunk_size & 1)  # RIFF chunks are word aligned.
  return None


def to_int16(x: np.ndarray) -> np.ndarray:
  """Float waveform in [-1, 1] -> int16, rounding, saturating at the int16 range."""
  return np.clip(np.round(x * _INT16_SCALE), -32768, 32767).astype(np.int16)


def _check_target_rate(path: pathlib.Path, sample_rate) -> int:
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or (
      sample_rate <= 0):
    raise ValueError(f"decode({path}): the target sample_rate must be a positive integer, got "
                     f"{sample_rate!r}")
  return int(sample_rate)


def _info(path: pathlib.Path):
  """soundfile's header of `path`; AudioError('missing' / 'unreadable')."""
  if not path.exists():  # libsndfile would only say "System error"
    raise AudioError(path, "missing", "no such file (it does not exist)")
  try:
    info = soundfile.info(str(path))
  except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, EOFError) as e:
    raise AudioError(path, "unreadable", f"{type(e).__name__}: {e}") from e
  return info


def duration_seconds(path: os.PathLike | str) -> float:
  """A file's duration from its header (frames / rate); AudioError as `decode`."""
  path = pathlib.Path(path)
  info = _info(path)
  _check_source_rate(path, info.samplerate)
  return info.frames / info.samplerate


def _check_source_rate(path: pathlib.Path, source_rate: int) -> None:
  if source_rate < MIN_SOURCE_RATE:
    raise AudioError(path, "unsupported_rate", f"the header says {source_rate} Hz; rates "
                     f"below {MIN_SOURCE_RATE} Hz are not audio recordings (damaged header?)")


# Frames read per call: a damaged header can claim billions of frames, and soundfile sizes its
# output array by the header, so the file is read in blocks and only what it holds is kept.
_READ_BLOCK = 1 << 20


def _read(path: pathlib.Path, dtype: str, start: int = 0, frames: int = -1) -> np.ndarray:
  """[frames, channels] samples of `path` from frame `start` (only those are held)."""
  try:
    with soundfile.SoundFile(str(path)) as f:
      if start:
        f.seek(start)
      blocks, left = [], frames
      while left != 0:
        want = _READ_BLOCK if left < 0 else min(_READ_BLOCK, left)
        block = f.read(want, dtype=dtype, always_2d=True)
        if len(block):
          blocks.append(block)
          left = left - len(block) if left > 0 else left
        if len(block) < want:
          break
      data = (np.concatenate(blocks) if len(blocks) > 1 else blocks[0] if blocks
              else np.zeros((0, f.channels), dtype))
  except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, EOFError) as e:
    raise AudioError(path, "unreadable", f"{type(e).__name__}: {e}") from e
  if data.shape[0] == 0:
    raise AudioError(path, "empty", "the file holds zero audio frames")
  return data


def _float_mono(path: pathlib.Path, data: np.ndarray, source_rate: int, sample_rate: int,
                quality: str, notes: list[str]) -> np.ndarray:
  """Float [frames, channels] -> float mono at `sample_rate` (downmix, attenuation, soxr)."""
  if not np.isfinite(data).all():
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    raise AudioError(path, "non_finite", f"{bad} NaN/Inf samples")
  if data.shape[1] > 1:
    # Mean, not sum: keeps the level of a correlated stereo pair and cannot overflow.
    x = data.mean(axis=1, dtype=np.float64).astype(np.float32)
    notes.append("downmixed")
  else:
    x = data[:, 0]
  peak = float(np.max(np.abs(x)))
  if peak > 1.0:
    # Float files may exceed full scale; scaling keeps the waveform shape that clipping
    # would destroy.
    x = x / peak
    notes.append("attenuated")
  if source_rate != sample_rate:
    try:
      x = soxr.resample(x, source_rate, sample_rate, quality=quality)
    except (ValueError, RuntimeError) as e:
      raise AudioError(path, "unreadable", f"resampling {source_rate} Hz -> {sample_rate} Hz "
                       f"failed: {type(e).__name__}: {e}") from e
    notes.append("resampled")
    if len(x) == 0:
      raise AudioError(path, "empty", f"{data.shape[0]} frames at {source_rate} Hz resample "
                       f"to zero frames at {sample_rate} Hz")
  return x


def decode(path: os.PathLike | str, sample_rate: int, *, quality: str = "HQ") -> DecodedAudio:
  """Reads one audio file as mono int16 at `sample_rate` (see the module policy table).

  Args:
    path: any format libsndfile reads (WAV, FLAC, OGG, MP3, AIFF, ...).
    sample_rate: the target rate in Hz.
    quality: soxr resampling quality ('QQ', 'LQ', 'MQ', 'HQ', 'VHQ').

  Returns:
    The decoded clip: `samples` int16 [S] with S = frames * sample_rate / source_rate (+-1;
    S = frames, bit-exact samples, for mono PCM16 at `sample_rate`), `sample_rate` the target,
    `source_rate` / `source_channels` the file's.

  Raises:
    AudioError: the file is missing, unreadable (not audio, a corrupt header, a truncated
      compressed stream), empty (zero frames, or none left after resampling), holds NaN/Inf
      samples or has a source rate below `MIN_SOURCE_RATE`; the message names the file.
    ValueError: `sample_rate` is not a positive integer (a caller error, not a file problem).
  """
  path = pathlib.Path(path)
  sample_rate = _check_target_rate(path, sample_rate)
  info = _info(path)
  # Fast path: nothing to convert, so keep the stored samples bit-exact.
  exact = info.channels == 1 and info.samplerate == sample_rate and info.subtype == "PCM_16"
  data = _read(path, "int16" if exact else "float32")
  _check_source_rate(path, info.samplerate)
  notes = ["truncated"] if wav_truncation(path) else []
  if exact:
    return DecodedAudio(data[:, 0].copy(), sample_rate, info.samplerate, data.shape[1],
                        tuple(notes))
  x = _float_mono(path, data, info.samplerate, sample_rate, quality, notes)
  return DecodedAudio(to_int16(x), sample_rate, info.samplerate, data.shape[1], tuple(notes))


# Source seconds read on each side of a crop that is resampled: the soxr filter's support is
# milliseconds, so the crop's samples equal those of the whole file resampled.
_CROP_MARGIN_SECONDS = 0.05


def decode_crop(path: os.PathLike | str, sample_rate: int, num_samples: int,
                crop: str = "head", *, quality: str = "HQ") -> DecodedAudio:
  """`num_samples` of `decode(path, sample_rate)` taken at `crop`, reading only those frames.

  'head' takes the first samples, 'center' those starting at (L - num_samples) // 2 of the
  decoded length L. A file no longer than the crop is decoded whole (its samples are all the
  crop). Only the frames of the crop (plus a resampling margin) are held in memory, so an hour
  of multi-channel audio costs what its crop costs. Float files above full scale are
  attenuated by the peak of the frames read (the whole file's peak is not known).

  Raises:
    AudioError: as `decode`.
  """
  path = pathlib.Path(path)
  sample_rate = _check_target_rate(path, sample_rate)
  if crop not in ("head", "center"):
    raise ValueError(f"decode_crop({path}): crop must be 'head' or 'center', got {crop!r}")
  info = _info(path)
  src = info.samplerate
  if info.frames <= 0:  # as `decode` says it: empty before a bad rate
    return _crop_of_whole(path, sample_rate, num_samples, crop, quality)
  _check_source_rate(path, src)
  total = int(round(info.frames * sample_rate / src))  # soxr's output length
  margin = 0 if src == sample_rate else int(np.ceil(_CROP_MARGIN_SECONDS * src))
  if total <= num_samples or info.format == "MPEG":
    # Short files (and MP3, whose frame count is an estimate): nothing to save.
    return _crop_of_whole(path, sample_rate, num_samples, crop, quality)
  t0 = policy.crop_start(total, num_samples, crop)  # the one crop policy
  # Start the read on a frame whose time is a whole number of target samples, so the
  # resampled window is the whole file's output shifted by a whole number of samples.
  step = src // math.gcd(src, sample_rate)
  first = max(0, (t0 * src // sample_rate - margin) // step * step)
  offset = first * sample_rate // src
  stop = min(info.frames, -(-(t0 + num_samples) * src // sample_rate) + margin)
  exact = info.channels == 1 and src == sample_rate and info.subtype == "PCM_16"
  data = _read(path, "int16" if exact else "float32", start=first, frames=stop - first)
  notes = ["cropped"] + (["truncated"] if wav_truncation(path) else [])
  if exact:
    samples = data[t0 - first:t0 - first + num_samples, 0].copy()
  else:
    x = _float_mono(path, data, src, sample_rate, quality, notes)
    samples = to_int16(x[t0 - offset:t0 - offset + num_samples])
  if len(samples) < num_samples:  # the header over-states the frames: decode it all
    return _crop_of_whole(path, sample_rate, num_samples, crop, quality)
  return DecodedAudio(samples, sample_rate, src, info.channels, tuple(notes))


def _crop_of_whole(path: pathlib.Path, sample_rate: int, num_samples: int, crop: str,
                   quality: str) -> DecodedAudio:
  """The crop taken from the whole decoded file."""
  wave = decode(path, sample_rate, quality=quality)
  start = policy.crop_start(len(wave.samples), num_samples, crop)
  return dataclasses.replace(wave, samples=wave.samples[start:start + num_samples])
