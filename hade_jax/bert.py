"""BERT / RoBERTa text tower, numerically HF `BertModel`, `RobertaModel` and `ClapTextModel`.

Parameter paths mirror the HF state dict of a bare model (`encoder/layer/3/attention/self/query/
kernel` <-> `encoder.layer.3.attention.self.query.weight`), so `convert.bert` imports
checkpoints by name. The three HF classes share one post-LayerNorm encoder; they differ only
in their embeddings' position ids:
  - BERT: position of token m is m;
  - RoBERTa (and CLAP's text tower, a RoBERTa copy): counted over tokens whose id is not
    `pad_token_id`, starting at pad_token_id + 1; pad tokens get pad_token_id. As in HF
    (fairseq), this follows `input_ids`, not the attention mask.
Padded positions are masked as keys only, as in HF: their own outputs are computed (and equal
HF's) but never influence a valid position.

Legend: B: texts, M: tokens, W: width (hidden_size), A: heads, H: head width,
  I: intermediate width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hade_jax import fields, layers

VARIANTS = ("bert", "roberta")
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings")
# HF `model_type` -> variant. CLAP's text tower is RoBERTa with persistent position buffers.
_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "clap_text_model": "roberta"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Text tower geometry and regularisation; field names follow HF `BertConfig`."""

  vocab_size: int = 30522  # rows of the word embedding (bert-base-uncased WordPiece).
  hidden_size: int = 768  # W, width of every token state.
  num_hidden_layers: int = 12  # encoder blocks; hidden_states has this many + 1 entries.
  num_attention_heads: int = 12  # A; hidden_size must be a multiple of it.
  intermediate_size: int = 3072  # I, width of the feed-forward layer.
  hidden_act: str = "gelu"  # feed-forward activation, by HF name ('gelu' = exact erf GELU).
  hidden_dropout_prob: float = 0.1  # dropout on embeddings and on both residual branches.
  attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities.
  max_position_embeddings: int = 512  # rows of the position embedding.
  type_vocab_size: int = 2  # rows of the token-type (segment) embedding; RoBERTa has 1.
  layer_norm_eps: float = 1e-12  # eps of every LayerNorm.
  pad_token_id: int = 0  # RoBERTa: positions start after it and pad tokens take it.
  initializer_range: float = 0.02  # std of the normal init of embeddings and kernels.
  variant: str = "bert"  # 'bert' (positions 0..M-1) or 'roberta' (from non-pad input ids).
  add_pooler: bool = True  # tanh(dense(first token)), HF `pooler_output`; CLAP projects it.
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32.

  def __post_init__(self):
    # Types and ranges first (a config.json may say hidden_size="384" or num_hidden_layers=-3),
    # then the sizes, so that nothing absurd is ever allocated.
    p = fields.Problems(self)
    p.types()
    p.dtype()
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size"):
      p.at_least(name, 1)
    p.at_least("pad_token_id", 0)
    p.at_most("num_hidden_layers", fields.MAX_BLOCKS, "blocks per tower")
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      p.within(name, 0.0, 1.0)
    p.positive("layer_norm_eps")
    p.at_least("initializer_range", 0.0)
    p.choice("variant", VARIANTS)
    if p.items:
      p.raise_any()
    p.param_bytes(self.num_params, _SIZE_FIELDS)
    if self.hidden_size % self.num_attention_heads:
      p.add("hidden_size", f"{self.hidden_size} is not a multiple of num_attention_heads "
            f"{self.num_attention_heads}")
    try:
      layers.activation(self.hidden_act)  # fails early, naming the known activations
    except ValueError as e:
      p.add("hidden_act", str(e))
    if self.variant == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
      p.add("max_position_embeddings", f"RoBERTa positions start at pad_token_id + 1 = "
            f"{self.pad_token_id + 1}: max_position_embeddings {self.max_position_embeddings} "
            "leaves no room")
    p.raise_any()

  @property
  def num_params(self) -> int:
    """Parameters, to within biases and LayerNorms (for the size check)."""
    w, i = self.hidden_size, self.intermediate_size
    rows = self.vocab_size + self.max_position_embeddings + self.type_vocab_size
    return rows * w + self.num_hidden_layers * (4 * w * w + 2 * w * i) + w * w

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def max_length(self) -> int:
    """Longest input (special tokens included) the position table covers."""
    if self.variant == "roberta":
      return self.max_position_embeddings - self.pad_token_id - 1  # 512 for roberta-base
    return self.max_position_embeddings

  # -- Presets ---------------------------------------------------------------------------------

  @classmethod
  def bert_base(cls, **overrides) -> BertConfig:
    """bert-base-uncased: 12 blocks, width 768, 12 heads."""
    return cls(**overrides)

  @classmethod
  def roberta_base(cls, **overrides) -> BertConfig:
    """roberta-base (and LAION-CLAP's text tower): BPE vocabulary, positions after pad id 1."""
    base = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                layer_norm_eps=1e-5, pad_token_id=1, variant="roberta")
    return cls(**{**base, **overrides})

  @classmethod
  def minilm_l6(cls, **overrides) -> BertConfig:
    """all-MiniLM-L6-v2: BERT layout, 6 blocks, width 384, 12 heads of 32."""
    base = dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)
    return cls(**{**base, **overrides})

  @classmethod
  def small_test(cls, **overrides) -> BertConfig:
    """A cheap geometry for tests: 2 blocks of width 32, 4 heads, 99 ids, 64 positions."""
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=64)
    return cls(**{**base, **overrides})

  @classmethod
  def from_hf(cls, d: Mapping[str, Any], **overrides) -> BertConfig:
    """From an HF `BertConfig`, `RobertaConfig` or `ClapTextConfig` dict.

    A `ClapConfig` dict (model_type 'clap') is accepted too: its `text_config` is used.
    `add_pooler` and `dtype` are not HF fields: they come from `overrides` (default: pooler
    on, float32). Raises ValueError naming the field for anything this tower does not
    implement (relative position embeddings, decoders, cross-attention).
    """
    if d.get("model_type") == "clap" or ("text_config" in d and "model_type" not in d):
      d = {"model_type": "clap_text_model", **(d.get("text_config") or {})}
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(f"config field model_type={model_type!r} is not a BERT-layout text "
                       f"tower; supported: {sorted(_MODEL_TYPES)}")
    position_type = d.get("position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
      raise ValueError(f"config field position_embedding_type={position_type!r} is not "
                       "supported: only 'absolute' position embeddings are implemented")
    for field in ("is_decoder", "add_cross_attention"):
      if d.get(field):
        raise ValueError(f"config field {field}=True is not supported: the text tower is a "
                         "bidirectional encoder without cross-attention")
    act = d.get("hidden_act", cls.hidden_act)
    if not isinstance(act, str):
      raise ValueError(f"config field hidden_act={act!r} must name an activation")
    try:
      layers.activation(act)
    except ValueError as e:
      raise ValueError(f"config field hidden_act: {e}") from None
    fields = {f.name for f in dataclasses.fields(cls)} - {"variant", "add_pooler", "dtype"}
    kwargs = {k: d[k] for k in fields if d.get(k) is not None}
    kwargs["variant"] = _MODEL_TYPES[model_type]
    if kwargs["variant"] == "roberta" and d.get("pad_token_id") is None:
      raise ValueError(f"config field pad_token_id is missing: {model_type} positions are "
                       "counted from it")
    return cls(**{**kwargs, **overrides})


# ---------------------------------------------------------------------------------------------
# Pure functions.


def position_ids(input_ids_BxM: jax.Array, cfg: BertConfig) -> jax.Array:
  """Position ids as HF computes them when none are passed.

  BERT: 0..M-1 for every row. RoBERTa (fairseq `make_positions`): running count of non-pad
  tokens plus pad_token_id, and pad_token_id at pad tokens, so right padding never shifts the
  positions of valid tokens.
  """
  b, m = input_ids_BxM.shape
  if cfg.variant == "bert":
    return jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
  real_BxM = (input_ids_BxM != cfg.pad_token_id).astype(jnp.int32)
  return jnp.cumsum(real_BxM, axis=1, dtype=jnp.int32) * real_BxM + cfg.pad_token_id


def mean_pool(hidden_BxMxW: jax.Array, mask_BxM: jax.Array) -> jax.Array:
  """Mean of the valid token states (sentence-transformers' `pooling_mode_mean_tokens`).

  Args:
    hidden_BxMxW: token states.
    mask_BxM: 1 (or True) at valid tokens.

  Returns:
    [B, W]; a row without valid tokens gives zeros (the count is clamped at 1e-9, as there).
  """
  mask_BxMx1 = mask_BxM.astype(hidden_BxMxW.dtype)[..., None]
  sum_BxW = jnp.sum(hidden_BxMxW * mask_BxMx1, axis=1)
  count_Bx1 = jnp.maximum(jnp.sum(mask_BxMx1, axis=1), 1e-9)
  return sum_BxW / count_Bx1


def l2_normalize(x_BxW: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) along the last axis (torch `F.normalize`, sentence-transformers)."""
  norm_Bx1 = jnp.linalg.norm(x_BxW, axis=-1, keepdims=True)
  return x_BxW / jnp.maximum(norm_Bx1, eps)


# ---------------------------------------------------------------------------------------------
# Modules. Attribute names are HF's, so parameter paths are the checkpoint's keys.


def _linear(d_in: int, d_out: int, cfg: BertConfig, *, rngs: nnx.Rngs) -> nnx.Linear:
  # HF BERT initialises kernels with N(0, initializer_range) and biases with zeros.
  return nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


def _embed(rows: int, cfg: BertConfig, *, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(rows, cfg.hidden_size, dtype=cfg.dtype, param_dtype=jnp.float32,
                   embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


def _layer_norm(cfg: BertConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class Embeddings(nnx.Module):
  """word + token type + position embeddings, LayerNorm, dropout (HF `BertEmbeddings`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.word_embeddings = _embed(cfg.vocab_size, cfg, rngs=rngs)
    self.position_embeddings = _embed(cfg.max_position_embeddings, cfg, rngs=rngs)
    self.token_type_embeddings = _embed(cfg.type_vocab_size, cfg, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs=rngs)

  def __call__(self, input_ids_BxM: jax.Array, token_type_ids_BxM: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    pos_BxM = position_ids(input_ids_BxM, self.cfg)
    # HF's summation order: (word + token type) + position.
    x_BxMxW = self.word_embeddings(input_ids_BxM) + self.token_type_embeddings(token_type_ids_BxM)
    x_BxMxW = x_BxMxW + self.position_embeddings(pos_BxM)
    x_BxMxW = self.LayerNorm(x_BxMxW)
    return layers.dropout(x_BxMxW, self.cfg.hidden_dropout_prob, rngs)


class SelfAttention(nnx.Module):
  """Multi-head scaled dot-product attention over the valid keys (HF `BertSelfAttention`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.query = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)
    self.key = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)
    self.value = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x_BxMxW: jax.Array, valid_BxM: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    cfg = self.cfg
    b, m, w = x_BxMxW.shape
    split = lambda t: t.reshape(b, m, cfg.num_attention_heads, cfg.head_dim)
    q_BxMxAxH = split(self.query(x_BxMxW))
    k_BxMxAxH = split(self.key(x_BxMxW))
    v_BxMxAxH = split(self.value(x_BxMxW))
    scores_BxAxMxM = jnp.einsum("bqah,bkah->baqk", q_BxMxAxH, k_BxMxAxH)
    scores_BxAxMxM = scores_BxAxMxM.astype(jnp.float32) * (cfg.head_dim ** -0.5)
    # HF adds the dtype's minimum at padded keys: their probability underflows to exactly 0,
    # and a row with no valid key at all attends uniformly instead of producing NaN.
    scores_BxAxMxM = jnp.where(valid_BxM[:, None, None, :], scores_BxAxMxM,
                               jnp.finfo(jnp.float32).min)
    probs_BxAxMxM = jax.nn.softmax(scores_BxAxMxM, axis=-1).astype(x_BxMxW.dtype)
    probs_BxAxMxM = layers.dropout(probs_BxAxMxM, cfg.attention_probs_dropout_prob, rngs)
    out_BxMxAxH = jnp.einsum("baqk,bkah->bqah", probs_BxAxMxM, v_BxMxAxH)
    return out_BxMxAxH.reshape(b, m, w)


class AddNorm(nnx.Module):
  """dense -> dropout -> LayerNorm(. + residual) (HF `BertSelfOutput` / `BertOutput`)."""

  def __init__(self, d_in: int, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dropout_rate = cfg.hidden_dropout_prob
    self.dense = _linear(d_in, cfg.hidden_size, cfg, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, residual_BxMxW: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    x_BxMxW = layers.dropout(self.dense(x), self.dropout_rate, rngs)
    return self.LayerNorm(x_BxMxW + residual_BxMxW)


class Attention(nnx.Module):
  """`self` (attention) and `output` (projection + residual + LayerNorm)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.self = SelfAttention(cfg, rngs=rngs)
    self.output = AddNorm(cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x_BxMxW: jax.Array, valid_BxM: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    return self.output(self.self(x_BxMxW, valid_BxM, rngs), x_BxMxW, rngs)


class Intermediate(nnx.Module):
  """The feed-forward expansion W -> I and its activation."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.hidden_act = cfg.hidden_act  # a name, not a function: the graph stays hashable
    self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs=rngs)

  def __call__(self, x_BxMxW: jax.Array) -> jax.Array:
    return layers.activation(self.hidden_act)(self.dense(x_BxMxW))


class Layer(nnx.Module):
  """One post-LayerNorm Transformer block (HF `BertLayer`)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs=rngs)
    self.intermediate = Intermediate(cfg, rngs=rngs)
    self.output = AddNorm(cfg.intermediate_size, cfg, rngs=rngs)

  def __call__(self, x_BxMxW: jax.Array, valid_BxM: jax.Array,
               rngs: nnx.Rngs | None) -> jax.Array:
    x_BxMxW = self.attention(x_BxMxW, valid_BxM, rngs)
    return self.output(self.intermediate(x_BxMxW), x_BxMxW, rngs)


class Encoder(nnx.Module):
  """The block stack; `layer` is indexed like HF's `encoder.layer.<i>`."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class Pooler(nnx.Module):
  """tanh(dense(state of the first token)): BERT's [CLS] pooler, CLAP's text feature."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(cfg.hidden_size, cfg.hidden_size, cfg, rngs=rngs)

  def __call__(self, x_BxMxW: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(x_BxMxW[:, 0]))


class BertModel(nnx.Module):
  """BERT / RoBERTa encoder; paths mirror HF `BertModel` / `RobertaModel` / `ClapTextModel`."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs=rngs)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.pooler = Pooler(cfg, rngs=rngs) if cfg.add_pooler else None

  def __call__(
      self,
      input_ids_BxM: jax.Array,
      attention_mask_BxM: jax.Array,
      token_type_ids_BxM: jax.Array | None = None,
      *,
      rngs: nnx.Rngs | None = None,
  ) -> tuple[jax.Array, dict[str, Any]]:
    """Encodes token ids.

    Args:
      input_ids_BxM: token ids, special tokens included; RoBERTa rows must hold
        `pad_token_id` at padded positions (its positions are counted from the ids).
      attention_mask_BxM: nonzero at valid tokens, 0 at padding.
      token_type_ids_BxM: segment ids; None = all 0 (HF's default).
      rngs: dropout randomness; None = evaluation.

    Returns:
      (final_BxMxW, aux): the last block's token states (HF `last_hidden_state`), and aux with
      `hidden_states`, a tuple of num_hidden_layers + 1 [B, M, W] arrays (embedding output,
      then every block, as HF's `output_hidden_states`), and `pooled`, HF's `pooler_output`
      [B, W] (None without a pooler). All in the compute dtype.
    """
    cfg = self.cfg
    if input_ids_BxM.ndim != 2 or attention_mask_BxM.shape != input_ids_BxM.shape:
      raise ValueError(f"expected input_ids and attention_mask of one [batch, tokens] shape, got "
                       f"{input_ids_BxM.shape} and {attention_mask_BxM.shape}")
    if input_ids_BxM.shape[1] > cfg.max_length:
      # Past the table a gather would silently clamp the position index.
      raise ValueError(f"{input_ids_BxM.shape[1]} tokens exceed the {cfg.max_length} positions "
                       "of the text tower; truncate the input")
    input_ids_BxM = input_ids_BxM.astype(jnp.int32)
    if token_type_ids_BxM is None:
      token_type_ids_BxM = jnp.zeros_like(input_ids_BxM)
    valid_BxM = attention_mask_BxM != 0
    x_BxMxW = self.embeddings(input_ids_BxM, token_type_ids_BxM.astype(jnp.int32), rngs)
    hidden_states = [x_BxMxW]
    for layer in self.encoder.layer:
      x_BxMxW = layer(x_BxMxW, valid_BxM, rngs)
      hidden_states.append(x_BxMxW)
    pooled_BxW = self.pooler(x_BxMxW) if self.pooler is not None else None
    return x_BxMxW, {"hidden_states": tuple(hidden_states), "pooled": pooled_BxW}
