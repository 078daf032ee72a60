"""HTS-AT audio tower (Swin Transformer over log-mel patches), numerically HF `ClapAudioEncoder`.

Parameter paths mirror the HF state dict without its `audio_encoder.` prefix
(`layers/0/blocks/1/attention/self/query/kernel` <-> `layers.0.blocks.1.attention.self.query.
weight`), so `convert.htsat` imports LAION-CLAP / HF weights by name. Only the non-fusion path
exists (HADE pairs one 10 s crop with a caption).

Forward, as HF: batch norm over mel bins -> bicubic resize of the time
(and, if short, mel) axis to the model's grid -> fold the [T, F] log-mel into a square
[R*F, T/R] "image" (R = freq_ratio time chunks stacked along frequency) -> 4x4 patch embed ->
Swin stages (window attention, shifted on odd blocks, patch merging between stages) ->
LayerNorm -> mean over tokens. HADE's per-stage frame sequences undo the fold: token rows of
chunk r hold time steps r*W .. r*W + W - 1, so averaging the rows of each chunk and
concatenating the chunks gives frames in time order.

Legend: B: clips, N: log-mel frames, F: mel bins, H: token-map rows (frequency within a time
chunk, chunks stacked), W: token-map columns (time within a chunk), C: channels, R: freq_ratio,
G: attention windows, P: tokens per window, A: heads, D: head width, T: time frames of a stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hade_jax import fields, layers

# HF builds the patch-embed, patch-merging and final LayerNorms with torch's default eps and
# only the blocks' LayerNorms with `layer_norm_eps`.
_TORCH_LN_EPS = 1e-5
# HF's shifted-window mask value (not -inf): scores across regions get -100 added.
_MASK_VALUE = -100.0
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(x) for x in v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v}")
  return v


@dataclasses.dataclass(frozen=True)
class HtsatConfig:
  """HTS-AT geometry and regularisation; field names follow HF `ClapAudioConfig`."""

  spec_size: int = 256  # side of the square image the log-mel is folded into.
  num_mel_bins: int = 64  # mel bins of the input (and channels of the input batch norm).
  patch_size: tuple[int, int] = (4, 4)  # patch-embed conv kernel.
  patch_stride: tuple[int, int] = (4, 4)  # patch-embed conv stride.
  patch_embed_input_channels: int = 1  # image channels; 1 without fusion.
  patch_embeds_hidden_size: int = 96  # stage-1 width (the "embed dim"); doubles per stage.
  depths: tuple[int, ...] = (2, 2, 6, 2)  # Swin blocks per stage.
  num_attention_heads: tuple[int, ...] = (4, 8, 16, 32)  # heads per stage.
  window_size: int = 8  # attention window side, in tokens.
  mlp_ratio: float = 4.0  # MLP hidden width / block width.
  qkv_bias: bool = True  # biases on query/key/value.
  hidden_dropout_prob: float = 0.1  # dropout after the MLP (HF default; LAION trained with 0).
  attention_probs_dropout_prob: float = 0.0  # dropout on attention probs and attention output.
  drop_path_rate: float = 0.0  # stochastic depth of the last block; linear from 0 over blocks.
  layer_norm_eps: float = 1e-5  # eps of the blocks' LayerNorms.
  hidden_act: str = "gelu"  # MLP activation, by HF name.
  enable_patch_layer_norm: bool = True  # LayerNorm after the patch embedding.
  flatten_patch_embeds: bool = True  # HF flag; the tower only works with True.
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32.

  def __post_init__(self):
    self._check_sizes()
    object.__setattr__(self, "patch_size", _pair(self.patch_size))
    object.__setattr__(self, "patch_stride", _pair(self.patch_stride))
    object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
    object.__setattr__(self, "num_attention_heads", tuple(int(h) for h in self.num_attention_heads))
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))  # also accepts 'bfloat16' etc.
    if len(self.depths) != len(self.num_attention_heads):
      raise ValueError(f"depths {self.depths} and num_attention_heads "
                       f"{self.num_attention_heads} differ in length")
    if self.freq_ratio < 1 or self.spec_size % self.freq_ratio:
      raise ValueError(f"spec_size {self.spec_size} must be a multiple of freq_ratio = "
                       f"spec_size // num_mel_bins = {self.freq_ratio}")
    if self.patch_embed_input_channels != 1 or not self.flatten_patch_embeds:
      raise ValueError("only the non-fusion HTS-AT (1 input channel, flattened patches) exists")
    for i, (dim, heads) in enumerate(zip(self.stage_widths, self.num_attention_heads, strict=True)):
      if dim % heads:
        raise ValueError(f"stage {i} width {dim} is not a multiple of its {heads} heads")
    for i, (h, w) in enumerate(self.stage_resolutions):
      if h % self.freq_ratio:
        raise ValueError(f"stage {i} token map has {h} rows, not a multiple of freq_ratio "
                         f"{self.freq_ratio}: its time chunks cannot be unfolded")
      if min(h, w) < self.window_size:
        # HF shrinks the window there but keeps the full-size bias table: its forward fails.
        raise ValueError(f"stage {i} token map {h}x{w} is smaller than window_size "
                         f"{self.window_size}; HF ClapAudio cannot run this geometry")

  def _check_sizes(self) -> None:
    """Types and ranges (a config.json may say anything), then the parameter bytes."""
    p = fields.Problems(self)
    p.types(skip=("patch_size", "patch_stride"))  # an int or a pair (`_pair`)
    p.dtype()
    for name in ("spec_size", "num_mel_bins", "patch_embeds_hidden_size", "window_size"):
      p.at_least(name, 1)
    for name in ("depths", "num_attention_heads", "patch_size", "patch_stride"):
      value = getattr(self, name)
      ints = value if fields.is_seq(value) else (value,)
      if not p.bad(name) and (not ints or not all(fields.is_int(x) and x >= 1 for x in ints)):
        p.add(name, f"expected positive integers, got {value!r}")
    if not p.bad("depths") and sum(self.depths) > fields.MAX_BLOCKS:
      p.add("depths", f"{self.depths}: must be <= {fields.MAX_BLOCKS} blocks in all (blocks "
            "per tower)")
    p.positive("mlp_ratio")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
      p.within(name, 0.0, 1.0)
    p.positive("layer_norm_eps")
    if p.items:
      p.raise_any()
    # Stage i has width C 2^i and depth d_i blocks of (4 + 2 mlp_ratio) C^2 weights; a patch
    # merging of 8 C^2 follows every stage but the last.
    c, num_params = self.patch_embeds_hidden_size, 0
    for i, depth in enumerate(self.depths):
      width = c * 2**i
      num_params += depth * int((4 + 2 * self.mlp_ratio) * width * width) + 8 * width * width
    p.param_bytes(num_params, ("patch_embeds_hidden_size", "depths", "mlp_ratio"))
    p.raise_any()

  @property
  def freq_ratio(self) -> int:
    """Time chunks stacked along frequency to make the image square (4 for 256 / 64)."""
    return self.spec_size // self.num_mel_bins

  @property
  def num_frames(self) -> int:
    """Log-mel frames the grid holds (1024 for tiny); shorter inputs are resized to it."""
    return self.spec_size * self.freq_ratio

  @property
  def spec_height(self) -> int:
    """Mel bins the grid holds; fewer bins are resized to it."""
    return self.spec_size // self.freq_ratio

  @property
  def grid_size(self) -> tuple[int, int]:
    return (self.spec_size // self.patch_stride[0], self.spec_size // self.patch_stride[1])

  @property
  def stage_resolutions(self) -> tuple[tuple[int, int], ...]:
    h, w = self.grid_size
    return tuple((h // 2**i, w // 2**i) for i in range(len(self.depths)))

  @property
  def stage_widths(self) -> tuple[int, ...]:
    return tuple(self.patch_embeds_hidden_size * 2**i for i in range(len(self.depths)))

  @property
  def num_features(self) -> int:
    """Width of the pooled output (HF ClapAudioConfig.hidden_size for a consistent config)."""
    return self.stage_widths[-1]

  @classmethod
  def tiny(cls, **overrides) -> HtsatConfig:
    """HTS-AT tiny (LAION-CLAP `clap-htsat-unfused`): 1024 frames x 64 mels -> 256 x 256."""
    return cls(**overrides)

  @classmethod
  def small_test(cls, **overrides) -> HtsatConfig:
    """A cheap 4-stage geometry for tests: 512 frames x 32 mels -> 128 x 128, window 4."""
    base = dict(spec_size=128, num_mel_bins=32, patch_embeds_hidden_size=16, depths=(2, 2, 2, 2),
                num_attention_heads=(2, 2, 4, 4), window_size=4)
    return cls(**{**base, **overrides})

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], **overrides) -> HtsatConfig:
    """From a `ClapAudioConfig` dict, or a `ClapConfig` dict (its `audio_config` is used)."""
    if "audio_config" in d or d.get("model_type") == "clap":
      d = d.get("audio_config") or {}
    if d.get("enable_fusion", False):
      raise ValueError("this checkpoint uses HTS-AT feature fusion (enable_fusion=True), which "
                       "hade_jax does not implement; use a non-fusion ('unfused') checkpoint")
    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
    return cls(**{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------
# Constants (numpy, built once per geometry and baked into the compiled program).


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
  """[P, P] index into the (2w-1)^2 bias table for query token p and key token q."""
  rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_rows = rows[:, None] - rows[None, :] + window - 1
  d_cols = cols[:, None] - cols[None, :] + window - 1
  return d_rows * (2 * window - 1) + d_cols


@functools.cache
def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[G, P, P] additive mask: tokens from different cyclic-shift regions do not attend."""

  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int64) + (i >= n - shift).astype(np.int64)

  label_HxW = regions(height)[:, None] * 3 + regions(width)[None, :]
  label_GxP = _partition(label_HxW[None, :, :, None], window)[0, :, :, 0]
  same_GxPxP = label_GxP[:, :, None] == label_GxP[:, None, :]
  return np.where(same_GxPxP, 0.0, _MASK_VALUE).astype(np.float32)


@functools.cache
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of torch's bicubic resize with align_corners=True (Keys, a = -0.75).

  Source position i * (in-1)/(out-1) and the weights are computed in float32, as torch does for
  float32 tensors; the 4 taps are clamped to the edges.
  """
  a = np.float32(-0.75)
  scale = np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.float32(0)
  pos = scale * np.arange(out_size, dtype=np.float32)
  base = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
  t = np.clip(pos - base.astype(np.float32), 0, 1).astype(np.float32)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  matrix = np.zeros((out_size, in_size), np.float32)
  for tap in range(4):
    idx = np.clip(base + tap - 1, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
  return matrix


def _partition(x_BxHxWxC, window):
  """[B, H, W, C] -> [B, G, P, C], windows in row-major order (HF window_partition)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def _unpartition(x_BxGxPxC, window, height, width):
  b, _, _, c = x_BxGxPxC.shape
  x = x_BxGxPxC.reshape(b, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def time_frames(x_BxHxWxC: jax.Array, freq_ratio: int) -> jax.Array:
  """Undoes the wav->image fold of a stage's token map: [B, H, W, C] -> [B, R*W, C] float32.

  Rows [r*H/R, (r+1)*H/R) hold time chunk r; they are averaged over frequency and the chunks
  concatenated, so frame r*W + w is time step w of chunk r.
  """
  b, h, w, c = x_BxHxWxC.shape
  if h % freq_ratio:
    raise ValueError(f"token map with {h} rows cannot be split into {freq_ratio} time chunks")
  x_BxRxWxC = x_BxHxWxC.astype(jnp.float32).reshape(b, freq_ratio, h // freq_ratio, w, c)
  return x_BxRxWxC.mean(axis=2).reshape(b, freq_ratio * w, c)


# ---------------------------------------------------------------------------------------------
# Modules. Attribute names are HF's, so parameter paths are the checkpoint's keys.


def _linear(d_in, d_out, cfg, *, rngs, use_bias=True):
  # Swin / HTS-AT initialise linear layers with a truncated normal of std 0.02.
  return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=cfg.dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _layer_norm(dim, eps, cfg, *, rngs):
  return nnx.LayerNorm(dim, epsilon=eps, dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)


class Dense(nnx.Module):
  """Holds one Linear as `dense` (HF's SelfOutput / Intermediate / Output wrappers)."""

  def __init__(self, d_in: int, d_out: int, cfg: HtsatConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(d_in, d_out, cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(x)


class PatchEmbed(nnx.Module):
  """Conv patch embedding of the folded log-mel image, then an optional LayerNorm."""

  def __init__(self, cfg: HtsatConfig, *, rngs: nnx.Rngs):
    pad = [((k - s) // 2,) * 2 for k, s in zip(cfg.patch_size, cfg.patch_stride, strict=True)]
    self.proj = nnx.Conv(cfg.patch_embed_input_channels, cfg.patch_embeds_hidden_size,
                         kernel_size=cfg.patch_size, strides=cfg.patch_stride, padding=pad,
                         dtype=cfg.dtype, param_dtype=jnp.float32, rngs=rngs)
    self.norm = (_layer_norm(cfg.patch_embeds_hidden_size, _TORCH_LN_EPS, cfg, rngs=rngs)
                 if cfg.enable_patch_layer_norm else None)

  def __call__(self, image_BxHxWx1: jax.Array) -> jax.Array:
    x_BxHxWxC = self.proj(image_BxHxWx1)
    return self.norm(x_BxHxWxC) if self.norm is not None else x_BxHxWxC


class SelfAttention(nnx.Module):
  """Window multi-head attention with a learned relative position bias (Swin)."""

  def __init__(self, cfg: HtsatConfig, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.window = cfg.window_size
    self.dropout_rate = cfg.attention_probs_dropout_prob
    self.query = _linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.key = _linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    self.value = _linear(dim, dim, cfg, rngs=rngs, use_bias=cfg.qkv_bias)
    table_shape = ((2 * cfg.window_size - 1) ** 2, num_heads)
    self.relative_position_bias_table = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(), table_shape, jnp.float32))

  def __call__(self, x_BxGxPxC: jax.Array, mask_GxPxP: np.ndarray | None,
               rngs: nnx.Rngs | None) -> jax.Array:
    b, g, p, c = x_BxGxPxC.shape
    heads = self.num_heads
    split = lambda t: t.reshape(b, g, p, heads, c // heads)
    q_BxGxPxAxD = split(self.query(x_BxGxPxC))
    k_BxGxPxAxD = split(self.key(x_BxGxPxC))
    v_BxGxPxAxD = split(self.value(x_BxGxPxC))
    scores_BxGxAxPxP = jnp.einsum("bgpad,bgqad->bgapq", q_BxGxPxAxD, k_BxGxPxAxD)
    scores_BxGxAxPxP = scores_BxGxAxPxP / math.sqrt(c // heads)
    index_PxP = relative_position_index(self.window)
    bias_AxPxP = self.relative_position_bias_table[...][index_PxP].transpose(2, 0, 1)
    scores_BxGxAxPxP = scores_BxGxAxPxP.astype(jnp.float32) + bias_AxPxP[None, None]
    if mask_GxPxP is not None:
      scores_BxGxAxPxP = scores_BxGxAxPxP + mask_GxPxP[None, :, None]
    probs_BxGxAxPxP = jax.nn.softmax(scores_BxGxAxPxP, axis=-1).astype(x_BxGxPxC.dtype)
    # As in the Transformer paper (and HF): dropout removes whole attended tokens.
    probs_BxGxAxPxP = layers.dropout(probs_BxGxAxPxP, self.dropout_rate, rngs)
    out_BxGxPxAxD = jnp.einsum("bgapq,bgqad->bgpad", probs_BxGxAxPxP, v_BxGxPxAxD)
    return out_BxGxPxAxD.reshape(b, g, p, c)


class Attention(nnx.Module):
  """`self` (window attention) and `output` (projection), as HF's ClapAudioAttention."""

  def __init__(self, cfg: HtsatConfig, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.self = SelfAttention(cfg, dim, num_heads, rngs=rngs)
    self.output = Dense(dim, dim, cfg, rngs=rngs)
    self.dropout_rate = cfg.attention_probs_dropout_prob  # HF uses the attention rate here

  def __call__(self, x_BxGxPxC, mask_GxPxP, rngs):
    out_BxGxPxC = self.output(self.self(x_BxGxPxC, mask_GxPxP, rngs))
    return layers.dropout(out_BxGxPxC, self.dropout_rate, rngs)


class SwinBlock(nnx.Module):
  """One (shifted-)window attention block + MLP (HF ClapAudioLayer)."""

  def __init__(self, cfg: HtsatConfig, dim: int, resolution: tuple[int, int], num_heads: int,
               drop_path: float, shift: int, *, rngs: nnx.Rngs):
    # HF: a map no larger than the window is one window, never shifted.
    self.shift = 0 if min(resolution) <= cfg.window_size else shift
    self.window = cfg.window_size
    self.drop_path = drop_path
    self.hidden_dropout = cfg.hidden_dropout_prob
    self.act = cfg.hidden_act
    self.layernorm_before = _layer_norm(dim, cfg.layer_norm_eps, cfg, rngs=rngs)
    self.attention = Attention(cfg, dim, num_heads, rngs=rngs)
    self.layernorm_after = _layer_norm(dim, cfg.layer_norm_eps, cfg, rngs=rngs)
    self.intermediate = Dense(dim, int(cfg.mlp_ratio * dim), cfg, rngs=rngs)
    self.output = Dense(int(cfg.mlp_ratio * dim), dim, cfg, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    _, h, w, _ = x_BxHxWxC.shape
    ws, shift = self.window, self.shift
    y = self.layernorm_before(x_BxHxWxC)
    # Pad (after the norm, as HF) to whole windows.
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask_GxPxP = shift_mask(hp, wp, ws, shift) if shift else None
    y_BxGxPxC = self.attention(_partition(y, ws), mask_GxPxP, rngs)
    y = _unpartition(y_BxGxPxC, ws, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x_BxHxWxC = x_BxHxWxC + layers.drop_path(y[:, :h, :w], self.drop_path, rngs)
    # HF applies stochastic depth to the attention branch only, not to the MLP.
    y = layers.activation(self.act)(self.intermediate(self.layernorm_after(x_BxHxWxC)))
    y = layers.dropout(self.output(y), self.hidden_dropout, rngs)
    return x_BxHxWxC + y


class PatchMerging(nnx.Module):
  """2x2 neighbouring tokens -> one token of twice the width (HF ClapAudioPatchMerging)."""

  def __init__(self, cfg: HtsatConfig, dim: int, *, rngs: nnx.Rngs):
    self.norm = _layer_norm(4 * dim, _TORCH_LN_EPS, cfg, rngs=rngs)
    self.reduction = _linear(4 * dim, 2 * dim, cfg, rngs=rngs, use_bias=False)

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    _, h, w, _ = x_BxHxWxC.shape
    x = jnp.pad(x_BxHxWxC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    # HF's channel order: (even row, even col), (odd, even), (even, odd), (odd, odd).
    x = jnp.concatenate([x[:, r::2, c::2] for c in range(2) for r in range(2)], axis=-1)
    return self.reduction(self.norm(x))


class Stage(nnx.Module):
  """Swin blocks at one resolution, then patch merging (all stages but the last)."""

  def __init__(self, cfg: HtsatConfig, index: int, drop_paths: Sequence[float], *,
               rngs: nnx.Rngs):
    dim = cfg.stage_widths[index]
    resolution = cfg.stage_resolutions[index]
    self.blocks = nnx.List([
        SwinBlock(cfg, dim, resolution, cfg.num_attention_heads[index], drop_paths[i],
                  0 if i % 2 == 0 else cfg.window_size // 2, rngs=rngs)
        for i in range(cfg.depths[index])
    ])
    self.downsample = (PatchMerging(cfg, dim, rngs=rngs) if index < len(cfg.depths) - 1
                       else None)

  def __call__(self, x_BxHxWxC, rngs):
    for block in self.blocks:
      x_BxHxWxC = block(x_BxHxWxC, rngs)
    merged = self.downsample(x_BxHxWxC) if self.downsample is not None else x_BxHxWxC
    return x_BxHxWxC, merged


class HtsatModel(nnx.Module):
  """HTS-AT audio encoder; paths mirror HF `ClapAudioModel.audio_encoder`.

  The input batch norm normalises with its running statistics (HF in eval mode) unless
  `model.train()` was called: then with batch statistics, updating the running ones in place
  (torch's momentum; the running variance takes the biased batch variance, torch's the
  unbiased one). Dropout and stochastic depth follow `rngs` alone.
  """

  def __init__(self, cfg: HtsatConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.batch_norm = nnx.BatchNorm(cfg.num_mel_bins, use_running_average=True,
                                    momentum=0.9,  # torch momentum 0.1
                                    epsilon=1e-5, param_dtype=jnp.float32,
                                    # log-mels sit far from 0 (about -40 dB): two-pass variance
                                    use_fast_variance=False, rngs=rngs)
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    drop_paths = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
    starts = np.cumsum((0,) + cfg.depths).tolist()
    self.layers = nnx.List([
        Stage(cfg, i, drop_paths[starts[i]:starts[i + 1]], rngs=rngs)
        for i in range(len(cfg.depths))
    ])
    self.norm = _layer_norm(cfg.num_features, _TORCH_LN_EPS, cfg, rngs=rngs)

  def mel_to_image(self, mel_BxNxF: jax.Array) -> jax.Array:
    """Normalised log-mel [B, N, F] -> [B, spec_size, spec_size, 1] image (HF reshape_mel2img).

    Time (and mel, when fewer than the grid holds) is resized with torch's bicubic kernel;
    then time chunk r of N/R frames becomes rows [r*F, (r+1)*F) of the image.
    """
    cfg = self.cfg
    b, n, f = mel_BxNxF.shape
    if n > cfg.num_frames or f > cfg.spec_height:
      raise ValueError(f"log-mel of {n} frames x {f} mels exceeds the model's "
                       f"{cfg.num_frames} x {cfg.spec_height} grid")
    if n < cfg.num_frames:
      mel_BxNxF = jnp.einsum("mn,bnf->bmf", bicubic_matrix(n, cfg.num_frames), mel_BxNxF,
                             precision=_HIGHEST)
    if f < cfg.spec_height:
      # HF resizes time and mel in two calls; it fails when both are short, we do not.
      mel_BxNxF = jnp.einsum("gf,bnf->bng", bicubic_matrix(f, cfg.spec_height), mel_BxNxF,
                             precision=_HIGHEST)
    r = cfg.freq_ratio
    n, f = cfg.num_frames, cfg.spec_height
    x_BxRxWxF = mel_BxNxF.reshape(b, r, n // r, f)
    image_BxHxW = x_BxRxWxF.transpose(0, 1, 3, 2).reshape(b, r * f, n // r)
    return image_BxHxW[..., None]

  def __call__(self, mel_BxNxF: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Encodes log-mels.

    Args:
      mel_BxNxF: `ClapFeatureExtractor` input_features with the channel axis squeezed:
        [batch, frames <= num_frames, mel bins = num_mel_bins], in dB.
      rngs: dropout / stochastic-depth randomness; None = evaluation.

    Returns:
      (pooled_BxC, aux): pooled_BxC is HF's `pooler_output` (mean of the final normed
      tokens, what CLAP's audio projection consumes), float32. aux holds
      `last_hidden_state` [B, C, H4/R, R*W4] as HF returns it; `hidden_states`, HF's 1 + stages
      [B, C, H, W] maps (patch embedding, then each stage after its patch merging; the last
      one before the final norm), both in the compute dtype; `frames`, per stage the token
      map before patch merging (stage 4: after the final norm) unfolded to [B, T_h, C_h] in
      time order, float32.
    """
    cfg = self.cfg
    if mel_BxNxF.ndim != 3 or mel_BxNxF.shape[-1] != cfg.num_mel_bins:
      raise ValueError(f"expected log-mel [batch, frames, {cfg.num_mel_bins}], "
                       f"got {mel_BxNxF.shape}")
    x_BxNxF = self.batch_norm(mel_BxNxF.astype(jnp.float32))
    image_BxHxWx1 = self.mel_to_image(x_BxNxF).astype(cfg.dtype)
    x_BxHxWxC = self.patch_embed(image_BxHxWx1)
    to_nchw = lambda t: t.transpose(0, 3, 1, 2)
    hidden_states = [to_nchw(x_BxHxWxC)]
    frames = []
    for stage in self.layers:
      before_BxHxWxC, x_BxHxWxC = stage(x_BxHxWxC, rngs)
      hidden_states.append(to_nchw(x_BxHxWxC))
      if stage.downsample is not None:
        frames.append(time_frames(before_BxHxWxC, cfg.freq_ratio))
    x_BxHxWxC = self.norm(x_BxHxWxC)
    frames.append(time_frames(x_BxHxWxC, cfg.freq_ratio))
    b, h, w, c = x_BxHxWxC.shape
    r = cfg.freq_ratio
    # HF's "group 2D CNN" layout: [B, C, rows per chunk, chunks * W] (time = chunk * W + w).
    last_BxCxHxT = (to_nchw(x_BxHxWxC).reshape(b, c, r, h // r, w)
                    .transpose(0, 1, 3, 2, 4).reshape(b, c, h // r, r * w))
    pooled_BxC = x_BxHxWxC.astype(jnp.float32).mean(axis=(1, 2))
    aux = {
        "last_hidden_state": last_BxCxHxT,
        "hidden_states": tuple(hidden_states),
        "frames": tuple(frames),
    }
    return pooled_BxC, aux
