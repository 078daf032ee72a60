"""Spectrogram thumbnails (PNG) of audio clips for the search page; numpy and zlib only.

The clip is decoded by `data_pipelines.audio_io` (the first `SECONDS` only: a long file costs
what its head costs), then a log-magnitude STFT on log-spaced frequency rows is mapped to a
dark-to-bright colour ramp. No JAX: thumbnails are drawn on the host while the model works.

Legend: F: frequency rows, W: time columns.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from data_pipelines import audio_io

RATE = 16_000  # decode rate: a thumbnail shows up to 8 kHz
SECONDS = 10.0  # at most the first seconds of a clip are drawn
WIDTH, HEIGHT = 192, 64  # pixels
N_FFT = 512
DYNAMIC_RANGE_DB = 80.0
# A perceptually ordered ramp (black, purple, orange, pale yellow) as (position, RGB).
_RAMP = np.array([[0.0, 0, 0, 4], [0.25, 80, 18, 123], [0.5, 182, 54, 121],
                  [0.75, 251, 136, 97], [1.0, 252, 253, 191]])


def spectrogram_FxW(wave: np.ndarray) -> np.ndarray:
  """[HEIGHT, WIDTH] values in [0, 1] (low frequencies in the last row) of a waveform."""
  wave = np.pad(np.asarray(wave, np.float32), (0, max(0, N_FFT - len(wave))))
  starts = np.linspace(0, len(wave) - N_FFT, WIDTH).astype(np.int64)
  frames_WxT = wave[starts[:, None] + np.arange(N_FFT)] * np.hanning(N_FFT).astype(np.float32)
  power_WxB = np.abs(np.fft.rfft(frames_WxT, axis=-1)) ** 2
  # Log-spaced rows from 50 Hz: the low octaves, where most sounds live, get their share.
  freqs = np.geomspace(50.0, RATE / 2, HEIGHT + 1)
  bins = np.clip((freqs / (RATE / 2) * (N_FFT // 2)).astype(np.int64), 1, N_FFT // 2)
  rows_WxF = np.stack([power_WxB[:, lo:max(hi, lo + 1)].mean(axis=1)
                       for lo, hi in zip(bins[:-1], bins[1:], strict=True)], axis=1)
  db_WxF = 10 * np.log10(np.maximum(rows_WxF, 1e-10))
  db_WxF -= db_WxF.max()
  return np.clip(1 + db_WxF / DYNAMIC_RANGE_DB, 0, 1).T[::-1]


def colorize(values_FxW: np.ndarray) -> np.ndarray:
  """[F, W] in [0, 1] -> [F, W, 3] uint8 on the colour ramp."""
  rgb = [np.interp(values_FxW, _RAMP[:, 0], _RAMP[:, c]) for c in (1, 2, 3)]
  return np.stack(rgb, axis=-1).round().astype(np.uint8)


def png(rgb_FxWx3: np.ndarray) -> bytes:
  """A PNG file (8-bit RGB, no filtering) of an image."""
  height, width, _ = rgb_FxWx3.shape
  raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb_FxWx3))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def render(path: str | os.PathLike) -> bytes:
  """The PNG thumbnail of an audio file. Raises audio_io.AudioError as decoding does."""
  decoded = audio_io.decode_crop(path, RATE, int(SECONDS * RATE), "head")
  return png(colorize(spectrogram_FxW(decoded.samples.astype(np.float32) / 32768.0)))
