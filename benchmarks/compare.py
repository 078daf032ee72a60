"""hade_jax against the PyTorch reference (HF `ClapModel`), measured side by side.

The systems under test live in worker processes of their own (one per system and model
configuration, kept alive), so that each compiles/warms up once, owns its peak resident set
size, and runs alone on the machine while it is timed: the driver asks the workers in turn
(jax, torch, jax, torch, ...) to run a few timed repetitions, so drift of the machine (other
jobs, thermal state) falls on both systems alike and cancels in the ratios.

Workers:
  jax      hade_jax, CLAP-equivalent configuration (configs/base.py ablation 'global': HTS-AT
           tiny + RoBERTa-base + CLAP's projections, global InfoNCE only), the trainer's own
           `make_train_step` jitted with donation; also the embeddings and the profile parts.
  jax_full the same towers with the full HADE heads (THA + DCR + CA) and `hade_loss`.
  torch    HF transformers `ClapModel` with the same architecture and weights, trained eagerly
           in PyTorch (model.train(), CLAP's contrastive loss, backward, clipping, AdamW).
  peak     the machine's matmul peak: a large jitted JAX matmul and torch.matmul.

`JaxSystem`, `TorchSystem` and `PeakSystem` are plain classes: the test drives them
in-process at tiny sizes; `Worker` wraps one in a subprocess.

Legend: B: batch, S: samples, N: frames, F: mel bins, M: tokens, D: joint width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing as mp
import os
import pathlib
import resource
import statistics
import tempfile
import time
import traceback
from typing import Any

import numpy as np

# The optimizer the trainer builds from configs/base.py (groups, peak rates, decay, clipping);
# the schedule's length only sets the learning-rate values, not the cost.
TOTAL_STEPS, WARMUP_STEPS = 10_000, 100


@dataclasses.dataclass(frozen=True)
class Spec:
  """What both systems run: geometry (HF ClapConfig dicts), batch, input lengths, device."""

  audio: dict  # HF ClapAudioConfig fields.
  text: dict  # HF ClapTextConfig fields.
  projection_dim: int = 512
  batch: int = 8  # clips (and captions) per training step and per embedding call.
  seconds: float = 10.0  # audio per clip.
  sample_rate: int = 48_000
  text_len: int = 32  # tokens per caption, special tokens included (configs/base.py).
  device: str = "cpu"  # 'cpu' (float32) or 'gpu' (bfloat16 compute, float32 parameters).
  matmul_size: int = 4096  # edge of the square matmul that measures the peak.
  seed: int = 0
  # Compute dtype of both systems ('' = the device's: float32 on CPU, bfloat16 on GPU):
  # hade_jax's config.compute_dtype, torch.autocast for the reference, the peak matmul's dtype.
  compute_dtype: str = ""
  # hade_jax's config.dropout_rng (hade_jax/config_schema.py DROPOUT_RNGS).
  dropout_rng: str = "threefry2x32"
  # Extra XLA_FLAGS of the JAX workers (hade_jax and the JAX peak matmul), e.g.
  # '--xla_cpu_use_thunk_runtime=false': the same run measures PyTorch beside them.
  jax_xla_flags: str = ""
  # hade_jax's config.keep_freed_memory (hade_jax/host_memory.py), applied in the JAX workers as
  # the train command applies it. On here (the trainer's default is off): this step runs
  # faster with it, the demo slower.
  keep_freed_memory: bool = True

  @property
  def dtype(self) -> str:
    return self.compute_dtype or ("bfloat16" if self.device == "gpu" else "float32")

  @property
  def tolerance(self) -> float:
    """Max abs difference allowed between the two systems' unit-norm embeddings."""
    return 3e-2 if self.dtype == "bfloat16" else 1e-3

  @property
  def min_cosine(self) -> float:
    """Least cosine allowed between the two systems' embeddings of one item (bfloat16 runs):
    equal weights agree to rounding, other weights would give cosines near 0."""
    return 0.98 if self.dtype == "bfloat16" else 0.9999

  def clap_config(self) -> dict:
    return {"audio_config": dict(self.audio), "text_config": dict(self.text),
            "projection_dim": self.projection_dim}


def full_spec(**overrides) -> Spec:
  """LAION-CLAP geometry (hade_jax presets HtsatConfig.tiny + BertConfig.roberta_base)."""
  from hade_jax import bert, htsat

  a = htsat.HtsatConfig.tiny()
  t = bert.BertConfig.roberta_base()
  audio = dict(spec_size=a.spec_size, num_mel_bins=a.num_mel_bins, patch_size=a.patch_size[0],
               patch_stride=list(a.patch_stride),
               patch_embeds_hidden_size=a.patch_embeds_hidden_size, depths=list(a.depths),
               num_attention_heads=list(a.num_attention_heads), window_size=a.window_size,
               mlp_ratio=a.mlp_ratio, hidden_dropout_prob=a.hidden_dropout_prob,
               attention_probs_dropout_prob=a.attention_probs_dropout_prob,
               drop_path_rate=a.drop_path_rate, layer_norm_eps=a.layer_norm_eps,
               hidden_size=a.num_features, enable_fusion=False)
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
              intermediate_size=t.intermediate_size, hidden_act=t.hidden_act,
              hidden_dropout_prob=t.hidden_dropout_prob,
              attention_probs_dropout_prob=t.attention_probs_dropout_prob,
              max_position_embeddings=t.max_position_embeddings,
              type_vocab_size=t.type_vocab_size, layer_norm_eps=t.layer_norm_eps,
              pad_token_id=t.pad_token_id)
  return Spec(audio=audio, text=text, **overrides)


def tiny_spec(**overrides) -> Spec:
  """A geometry for tests (the ClapModel parity test's): seconds, not minutes."""
  audio = dict(spec_size=128, num_mel_bins=32, patch_embeds_hidden_size=16, hidden_size=128,
               depths=[1, 1, 2, 1], num_attention_heads=[2, 2, 4, 4], window_size=4,
               enable_fusion=False)
  text = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
              pad_token_id=1, layer_norm_eps=1e-5)
  base = dict(projection_dim=24, batch=2, seconds=1.0, text_len=12, matmul_size=256)
  return Spec(audio=audio, text=text, **(base | overrides))


def inputs(spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
  """One batch: waveforms, RoBERTa-style token ids (<s> first, pad id after), distinct clips."""
  rng = np.random.default_rng(seed)
  b, m = spec.batch, spec.text_len
  wave_BxS = (0.1 * rng.standard_normal((b, int(spec.seconds * spec.sample_rate)))
              ).astype(np.float32)
  lengths_B = rng.integers(max(2, m // 4), m + 1, size=b)
  mask_BxM = (np.arange(m)[None] < lengths_B[:, None]).astype(np.int32)
  ids_BxM = rng.integers(3, spec.text["vocab_size"], size=(b, m))
  ids_BxM[:, 0] = 0
  ids_BxM = np.where(mask_BxM > 0, ids_BxM, spec.text["pad_token_id"]).astype(np.int32)
  return {"audio": wave_BxS, "input_ids": ids_BxM, "attention_mask": mask_BxM,
          "clip_id": np.arange(b, dtype=np.int32)}


def mel_config(spec: Spec):
  from hade_jax import frontend

  return dataclasses.replace(frontend.LogMelConfig.laion_clap(), sample_rate=spec.sample_rate,
                             n_mels=spec.audio["num_mel_bins"])


def attention_blocks(spec: Spec) -> list[tuple[int, int, int, int]]:
  """(windows per clip G, heads A, tokens per window P, head width D) of every HTS-AT block."""
  from hade_jax import htsat

  cfg = htsat.HtsatConfig.from_hf(spec.audio)
  ws = cfg.window_size
  out = []
  for (h, w), width, heads, depth in zip(cfg.stage_resolutions, cfg.stage_widths,
                                         cfg.num_attention_heads, cfg.depths, strict=True):
    side = min(ws, h, w)  # HF: a map no larger than the window is one window
    g = -(-h // side) * -(-w // side)
    out += [(g, heads, side * side, width // heads)] * depth
  return out


def attention_flops(spec: Spec) -> float:
  """Matmul FLOPs of the window-attention core (QK^T and PV), forward + backward (3x)."""
  return 3 * sum(2 * 2 * spec.batch * g * a * p * p * d for g, a, p, d in attention_blocks(spec))


# Profile parts timing the dropout masks' random bits: name -> PRNG ('' = the spec's own).
DROPOUT_PARTS = {"dropout": "", "dropout_rbg": "rbg"}


def dropout_elements(spec: Spec) -> int:
  """Elements that get a dropout mask in one training step (rates > 0 in the spec)."""
  from hade_jax import htsat

  a, t, b = htsat.HtsatConfig.from_hf(spec.audio), spec.text, spec.batch
  n = 0
  if a.hidden_dropout_prob > 0:  # each Swin block's MLP output
    n += sum(b * h * w * c * depth for (h, w), c, depth in zip(
        a.stage_resolutions, a.stage_widths, a.depths, strict=True))
  if a.attention_probs_dropout_prob > 0:  # attention probabilities and attention output
    n += sum(b * g * heads * p * p + b * g * p * heads * d
             for g, heads, p, d in attention_blocks(spec))
  m, w, layers = spec.text_len, t["hidden_size"], t["num_hidden_layers"]
  if t.get("hidden_dropout_prob", 0.1) > 0:  # embeddings, attention output, FFN output
    n += b * m * w * (1 + 2 * layers)
  if t.get("attention_probs_dropout_prob", 0.1) > 0:
    n += b * t["num_attention_heads"] * m * m * layers
  return n


def embedding_check(spec: Spec, jax_AT: tuple, torch_AT: tuple) -> dict:
  """Max abs difference and least cosine of the two systems' unit embeddings (audio, text).

  Raises AssertionError beyond the spec's limits: max abs difference in float32, where both
  systems agree to rounding; the least cosine in bfloat16, where rounding through a dozen
  blocks moves single elements but not the direction.
  """
  out = {"tolerance": spec.tolerance, "min_cosine_allowed": spec.min_cosine}
  for what, j, t in zip(("audio", "text"), jax_AT, torch_AT, strict=True):
    out[f"{what}_max_abs_diff"] = float(np.abs(j - t).max())
    cos = np.sum(j * t, -1) / (np.linalg.norm(j, axis=-1) * np.linalg.norm(t, axis=-1))
    out[f"{what}_min_cosine"] = float(cos.min())
  bad = not all(np.isfinite(x).all() for x in (*jax_AT, *torch_AT))
  if spec.dtype == "bfloat16":
    bad |= min(out["audio_min_cosine"], out["text_min_cosine"]) < spec.min_cosine
  else:
    bad |= max(out["audio_max_abs_diff"], out["text_max_abs_diff"]) > spec.tolerance
  if bad:
    raise AssertionError(f"hade_jax and ClapModel embeddings differ beyond the limits: {out}")
  return out


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss_mb() -> float:
  """Peak resident set size of this process (getrusage ru_maxrss, KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, n: int) -> list[float]:
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def flops_of(compiled) -> float:
  """FLOPs of a compiled XLA program by its cost analysis (a dict, or a list of one)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def bytes_of(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("bytes accessed", float("nan")))


# ---------------------------------------------------------------------------------------------
# hade_jax.


def jax_config(spec: Spec, heads: str):
  """configs/base.py with the ablation `heads` ('global' or 'full') and the spec's towers."""
  from configs import base
  from hade_jax import bert, htsat

  config = base.get_config(f"ablation={heads}")
  config.model.audio = base.as_config(htsat.HtsatConfig.from_hf(spec.audio))
  config.model.text = base.as_config(bert.BertConfig.from_hf(
      {"model_type": "clap_text_model", **spec.text}))
  config.model.mel = base.as_config(mel_config(spec))
  config.model.heads.embed_dim = spec.projection_dim
  # The default levels (2, 4), (3, 8), (4, 12) at 12 blocks, scaled to the text tower's depth.
  blocks = spec.text["num_hidden_layers"]
  config.model.heads.levels = tuple((h, max(1, round(blocks * f)))
                                    for h, f in ((2, 1 / 3), (3, 2 / 3), (4, 1.0)))
  config.compute_dtype = spec.dtype
  config.dropout_rng = spec.dropout_rng
  config.keep_freed_memory = spec.keep_freed_memory
  config.data.spec_augment = False  # the PyTorch reference has none: both train without
  return config


class JaxSystem:
  """hade_jax: trainer.make_train_step, embeddings, profile parts."""

  def __init__(self, spec: Spec, clap_dir: str, heads: str = "global"):
    self.spec, self.clap_dir, self.heads = spec, clap_dir, heads

  def setup(self, embed: bool = True, train: bool = True, parts: tuple[str, ...] = ()) -> dict:
    """Builds the model from the saved ClapModel; compiles the step, embeddings, parts."""
    import jax
    from flax import nnx

    from hade_jax import hade, host_memory, optim, train_state, trainer
    from hade_jax.convert import clap as convert_clap
    from hade_jax.convert import common

    t0 = time.perf_counter()
    spec, config = self.spec, jax_config(self.spec, self.heads)
    self.config = config
    if config.keep_freed_memory:
      host_memory.keep_freed_pages()
    model = hade.HadeModel(hade.model_config(config), rngs=nnx.Rngs(config.seed))
    _, state_dict = common.load_hf_folder(self.clap_dir)
    report = convert_clap.import_clap(model, state_dict)
    if report.missing:
      raise RuntimeError(f"ClapModel import left parameters missing: {report.missing[:5]}")
    self.graphdef, params, _ = hade.split_model(model)
    self.tx = optim.make(params, config.optim, total_steps=TOTAL_STEPS,
                         warmup_steps=WARMUP_STEPS)
    # One copy of the weights: the embeddings run first, on the imported weights, before any
    # training step; the profile parts run last, on the trained ones (their cost is the same).
    self.state = train_state.TrainState.create(model, self.tx)
    del model, state_dict, params
    self.batch = jax.device_put(inputs(spec))
    # The step train_and_evaluate runs, built by the same function.
    step = jax.jit(trainer.train_step_of_config(config, self.graphdef, self.tx),
                   donate_argnums=(1,))
    seed = trainer.step_seed(config)
    t1 = time.perf_counter()
    out = {"build_s": t1 - t0, "jax_version": jax.__version__, "devices": str(jax.devices()),
           "params": int(sum(x.size for x in jax.tree.leaves(self.state.params))),
           "device_kind": jax.devices()[0].device_kind}
    if train:
      compiled = step.lower(seed, self.state, self.batch).compile()
      self.train_step = functools.partial(compiled, seed)
      out |= {"compile_s": time.perf_counter() - t1, "flops": flops_of(compiled),
              "bytes": bytes_of(compiled)}
      memory = compiled.memory_analysis()
      if memory is not None:
        out["xla_temp_mb"] = getattr(memory, "temp_size_in_bytes", 0) / 2**20
    if embed:
      self._compile_embed()
      out["embed_flops"] = self.embed_flops
    self._parts, self._warm = {}, set()
    for part in parts:
      self._prepare_part(part)
    return out

  def _weights(self):
    return self.state.params, self.state.rest

  def _compile_embed(self):
    import jax
    from flax import nnx

    from hade_jax import frontend
    from hade_jax import heads as hade_heads

    graphdef, b = self.graphdef, self.batch

    def audio(state, mel_BxNxF):
      model = nnx.merge(graphdef, *state)
      return hade_heads.normalize(model.encode_audio_mel(mel_BxNxF).global_AxD)

    def text(state, ids_BxM, mask_BxM):
      model = nnx.merge(graphdef, *state)
      return hade_heads.normalize(model.encode_text(ids_BxM, mask_BxM).global_TxD)

    # Both systems embed from the same log-mel (HF's ClapFeatureExtractor is numpy, outside
    # the model); the front end is timed with the training step.
    self.mel = jax.jit(frontend.log_mel, static_argnums=1)(b["audio"], mel_config(self.spec))
    self.embed_audio_fn = jax.jit(audio).lower(self._weights(), self.mel).compile()
    self.embed_text_fn = jax.jit(text).lower(
        self._weights(), b["input_ids"], b["attention_mask"]).compile()
    self.embed_flops = {"audio": flops_of(self.embed_audio_fn),
                        "text": flops_of(self.embed_text_fn)}

  def log_mel(self) -> np.ndarray:
    return np.asarray(self.mel)

  def train(self, n: int) -> dict:
    import jax

    losses_seen = []

    def one():
      self.state, m = self.train_step(self.state, self.batch)
      jax.block_until_ready((self.state, m))
      losses_seen.append(float(m["loss"]))

    faults = minor_faults()
    times = _timed(one, n)
    return {"times": times, "loss": losses_seen[-1], "faults": (minor_faults() - faults) / n}

  def embed(self, what: str, n: int) -> dict:
    import jax

    b = self.batch
    if what == "audio":
      fn = lambda: jax.block_until_ready(self.embed_audio_fn(self._weights(), self.mel))  # noqa: E731
    else:
      fn = lambda: jax.block_until_ready(  # noqa: E731
          self.embed_text_fn(self._weights(), b["input_ids"], b["attention_mask"]))
    return {"times": _timed(fn, n)}

  def embeddings(self, mel_BxNxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = self.batch
    a = self.embed_audio_fn(self._weights(), mel_BxNxF)
    t = self.embed_text_fn(self._weights(), b["input_ids"], b["attention_mask"])
    return np.asarray(a, np.float32), np.asarray(t, np.float32)

  # -- profile: the training step's parts, each compiled alone ---------------------------------

  def _tower_split(self, tower: str):
    from flax import nnx

    model = nnx.merge(self.graphdef, *self._weights())
    return nnx.split(model, nnx.All(nnx.Param, nnx.PathContains(tower)), ...)

  def _compile_part(self, part: str):
    """(compiled, make_args): make_args() builds the arguments from the live weights."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from hade_jax import layers

    b = self.batch
    rng = jax.random.key(1)
    if part in ("audio", "text"):
      tower = "audio_encoder" if part == "audio" else "text_encoder"
      graphdef, tower_params, others = self._tower_split(tower)
      r_BxD = jax.random.normal(jax.random.key(2), (self.spec.batch, self.spec.projection_dim))

      def loss(tower_params, others):
        model = nnx.merge(graphdef, tower_params, others, copy=True)
        model.train()
        rngs = nnx.Rngs(dropout=rng)
        if part == "audio":
          g_BxD = model.encode_audio(b["audio"], rngs=rngs).global_AxD
        else:
          g_BxD = model.encode_text(b["input_ids"], b["attention_mask"], rngs=rngs).global_TxD
        return jnp.sum(g_BxD.astype(jnp.float32) * r_BxD)

      def fwd_bwd(tower_params, others):  # gradients of the tower (and its projection input)
        return optax.global_norm(jax.grad(loss)(tower_params, others))

      compiled = jax.jit(fwd_bwd).lower(tower_params, others).compile()
      return compiled, lambda: self._tower_split(tower)[1:]
    if part == "attention":
      # HTS-AT's window-attention core as htsat.SelfAttention computes it (scores, relative
      # position bias, softmax, weighted values) for every block's shapes, forward + backward.
      blocks = attention_blocks(self.spec)
      keys = iter(jax.random.split(jax.random.key(3), 5 * len(blocks)))
      dtype = jnp.dtype(self.spec.dtype)  # q, k, v in the compute dtype, softmax in float32
      args = [tuple(jax.random.normal(next(keys), shape).astype(t) for shape, t in (
          ((self.spec.batch, g, p, a, d), dtype), ((self.spec.batch, g, p, a, d), dtype),
          ((self.spec.batch, g, p, a, d), dtype), ((a, p, p), jnp.float32),
          ((self.spec.batch, g, p, a, d), dtype)))
          for g, a, p, d in blocks]

      def core(q, k, v, bias_AxPxP):
        scores = jnp.einsum("bgpad,bgqad->bgapq", q, k) / math.sqrt(q.shape[-1])
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias_AxPxP[None, None], axis=-1)
        return jnp.einsum("bgapq,bgqad->bgpad", probs.astype(q.dtype), v)

      def fwd_bwd(args):
        total = 0.0
        for q, k, v, bias, ct in args:
          grads = jax.grad(lambda q, k, v, bias=bias, ct=ct: jnp.sum(core(q, k, v, bias) * ct),
                           argnums=(0, 1, 2))(q, k, v)
          total = total + sum(jnp.sum(g.astype(jnp.float32)) for g in grads)
        return total

      return jax.jit(fwd_bwd).lower(args).compile(), lambda: (args,)
    if part in DROPOUT_PARTS:
      # The random bits of the step's dropout masks (layers.dropout: layers.keep_mask, one
      # array of the batch's rows) with the step's PRNG ('dropout') or another one
      # (DROPOUT_PARTS), side by side.
      n, rows = dropout_elements(self.spec), self.spec.batch
      impl = DROPOUT_PARTS[part] or self.config.dropout_rng
      keys = jax.random.split(jax.random.key(4, impl=impl), 2)

      def masks(key):
        return jnp.sum(layers.keep_mask(key, 0.9, (rows, n // rows)))

      return jax.jit(masks).lower(keys[0]).compile(), lambda: (keys[1],)
    if part == "optimizer":
      # The step's update (clip + AdamW) of the live parameters and moments, donated and
      # written back; the gradients are a constant tree made when the part is timed.
      def update(params, opt_state, grads):
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

      params = self.state.params
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      compiled = jax.jit(update, donate_argnums=(0, 1)).lower(
          params, self.state.opt_state, shapes).compile()
      return compiled, None
    raise ValueError(f"unknown part {part!r}")

  def _prepare_part(self, part: str):
    if part not in self._parts:
      t = time.perf_counter()
      self._parts[part] = [*self._compile_part(part), time.perf_counter() - t]
      if part != "optimizer":  # its warm-up needs a gradient tree: at its first timing
        self._runner(part)()
        self._warm.add(part)

  def _runner(self, part: str):
    import jax
    import jax.numpy as jnp

    compiled, make_args, _ = self._parts[part]
    if part != "optimizer":
      args = make_args()
      return lambda: jax.block_until_ready(compiled(*args))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), self.state.params)

    def run():
      params, opt_state = compiled(self.state.params, self.state.opt_state, grads)
      self.state = self.state.replace(params=params, opt_state=opt_state)
      jax.block_until_ready(self.state)

    return run

  def part(self, part: str, n: int) -> dict:
    """Times one part of the step (compiled, and run once untimed, on first use)."""
    self._prepare_part(part)
    run = self._runner(part)
    if part not in self._warm:
      run()
      self._warm.add(part)
    compiled, _, compile_s = self._parts[part]
    times = _timed(run, n)
    return {"times": times, "flops": flops_of(compiled), "bytes": bytes_of(compiled),
            "compile_s": compile_s}

  def info(self) -> dict:
    import jax

    out = {"peak_rss_mb": peak_rss_mb()}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats and jax.devices()[0].platform != "cpu":
      out["peak_device_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# PyTorch reference.


def torch_log_mel(wave_BxS, cfg, window, filterbank_KxF):
  """The log-mel of `hade_jax.frontend.log_mel` in torch (for the reference's training step).

  torch.stft with centre reflect padding and the periodic Hann window, |X|^2, the same mel
  filterbank, floor and dB conversion; HF's ClapFeatureExtractor does the same in numpy.
  """
  import torch

  spec_BxKxN = torch.stft(wave_BxS, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.n_fft,
                          window=window, center=cfg.center, pad_mode=cfg.pad_mode,
                          return_complex=True)
  power_BxNxK = spec_BxKxN.abs().square().transpose(1, 2)
  mel_BxNxF = torch.clamp(power_BxNxK @ filterbank_KxF, min=cfg.mel_floor)
  ref = max(cfg.amin, cfg.ref)
  return 10.0 * (torch.log10(torch.clamp(mel_BxNxF, min=cfg.amin)) - math.log10(ref))


class TorchSystem:
  """HF transformers ClapModel trained eagerly in PyTorch, with the trainer's optimizer."""

  def __init__(self, spec: Spec, clap_dir: str):
    self.spec, self.clap_dir = spec, clap_dir

  def setup(self) -> dict:
    import torch
    import transformers
    from transformers import ClapConfig, ClapModel

    from configs import base
    from hade_jax import frontend

    t0 = time.perf_counter()
    spec = self.spec
    torch.set_num_threads(os.cpu_count() or 1)  # all cores (its default: physical cores)
    self.device = torch.device("cuda" if spec.device == "gpu" else "cpu")
    torch.manual_seed(spec.seed)
    model = ClapModel(ClapConfig(**spec.clap_config()))
    cfg = mel_config(spec)
    self.mel_cfg = cfg
    self.window = torch.from_numpy(frontend.hann_window(cfg.n_fft).astype(np.float32))
    self.filterbank = torch.from_numpy(frontend.mel_filterbank(cfg).astype(np.float32))
    # The input batch norm holds the statistics of the benchmark's log-mels, as a trained
    # model's would (HF initialises mean 0, variance 1: dB values far from 0 would pass
    # unnormalised and magnify float32 rounding in both systems alike).
    mel_BxNxF = torch_log_mel(torch.from_numpy(inputs(spec)["audio"]), cfg, self.window,
                              self.filterbank)
    for module in model.audio_model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(mel_BxNxF.mean((0, 1)))
        module.running_var.copy_(mel_BxNxF.var((0, 1)))
    model.save_pretrained(self.clap_dir)  # the weights hade_jax imports
    self.model = model.to(self.device)
    self.attn = {"text": model.text_model.config._attn_implementation,  # noqa: SLF001
                 "audio": model.audio_model.config._attn_implementation}  # noqa: SLF001
    # The trainer's optimizer (configs/base.py): two groups, AdamW, global-norm clip 2.0,
    # linear warmup + cosine decay.
    opt = base.get_config().optim
    groups = {"backbone": [], "heads": []}
    for name, p in model.named_parameters():
      is_tower = name.startswith(("audio_model.", "text_model."))
      groups["backbone" if is_tower else "heads"].append(p)
    kw = {"fused": True} if self._fused_ok() else {"foreach": True}
    self.adamw_impl = next(iter(kw))
    self.opt = torch.optim.AdamW(
        [{"params": groups[g], "lr": opt.lr[g], "weight_decay": opt.weight_decay[g]}
         for g in ("backbone", "heads")], betas=(opt.b1, opt.b2), eps=opt.eps, **kw)
    self.clip_norm = opt.clip_norm

    def lr_lambda(step):
      if step < WARMUP_STEPS:
        return step / WARMUP_STEPS
      t = (step - WARMUP_STEPS) / max(1, TOTAL_STEPS - WARMUP_STEPS)
      return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
    b = inputs(spec)
    dev = self.device
    self.batch = {k: torch.from_numpy(v).to(dev) for k, v in b.items()}
    self.batch["input_ids"] = self.batch["input_ids"].long()
    self.batch["attention_mask"] = self.batch["attention_mask"].long()
    self.window, self.filterbank = self.window.to(dev), self.filterbank.to(dev)
    self.params = [p for p in model.parameters() if p.requires_grad]
    # The embeddings of the saved weights, before any training step changes them.
    self.reference = self.embeddings(self.log_mel())
    return {"build_s": time.perf_counter() - t0, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "adamw": self.adamw_impl, "attention": self.attn,
            "params": int(sum(p.numel() for p in self.params))}

  def _fused_ok(self) -> bool:
    import torch

    try:
      p = torch.nn.Parameter(torch.zeros(2, device=self.device))
      p.grad = torch.ones(2, device=self.device)
      torch.optim.AdamW([p], fused=True).step()
      return True
    except (RuntimeError, TypeError):
      return False

  def _sync(self):
    import torch

    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def _autocast(self):
    import contextlib

    import torch

    if self.spec.dtype == "bfloat16":
      return torch.autocast(self.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def _mel(self):
    return torch_log_mel(self.batch["audio"], self.mel_cfg, self.window, self.filterbank)

  def warmup(self, n: int = 1) -> dict:
    """Untimed steps (allocator, oneDNN kernels), then one step under FlopCounterMode."""
    from torch.utils import flop_counter

    t = time.perf_counter()
    self.train(n)
    warm = time.perf_counter() - t
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      self._step()
    return {"warmup_s": warm, "counted_flops": float(counter.get_total_flops())}

  def _step(self) -> float:
    b = self.batch
    self.model.train()
    mel_BxNxF = self._mel()
    with self._autocast():
      out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       input_features=mel_BxNxF[:, None], return_loss=True)
    self.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    import torch

    torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
    self.opt.step()
    self.sched.step()
    return out.loss

  def train(self, n: int) -> dict:
    losses_seen = []

    def one():
      loss = self._step()
      self._sync()
      losses_seen.append(float(loss.detach()))

    faults = minor_faults()
    times = _timed(one, n)
    return {"times": times, "loss": losses_seen[-1], "faults": (minor_faults() - faults) / n}

  def embed(self, what: str, n: int) -> dict:
    """Times embedding calls (after `embeddings`, which sets the log-mel input)."""
    import torch

    b, model = self.batch, self.model
    model.eval()

    def one():
      with torch.no_grad(), self._autocast():
        if what == "audio":
          out = model.get_audio_features(input_features=self.mel[:, None])
        else:
          out = model.get_text_features(input_ids=b["input_ids"],
                                        attention_mask=b["attention_mask"])
      self._sync()
      return getattr(out, "pooler_output", out)

    one()  # warm-up
    return {"times": _timed(one, n)}

  def embeddings(self, mel_BxNxF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    b, model = self.batch, self.model
    model.eval()
    self.mel = torch.from_numpy(np.array(mel_BxNxF)).to(self.device)
    with torch.no_grad(), self._autocast():
      a = model.get_audio_features(input_features=self.mel[:, None])
      t = model.get_text_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    a, t = getattr(a, "pooler_output", a), getattr(t, "pooler_output", t)
    return a.float().cpu().numpy(), t.float().cpu().numpy()

  def log_mel(self) -> np.ndarray:
    import torch

    with torch.no_grad():
      return self._mel().float().cpu().numpy()

  def reference_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
    """(audio, text) unit embeddings of the saved weights, from this system's own log-mel."""
    return self.reference

  def part(self, part: str, n: int) -> dict:
    import torch

    b, model = self.batch, self.model
    if part in ("audio", "text"):
      r_BxD = torch.randn(self.spec.batch, self.spec.projection_dim, device=self.device)

      def one():
        model.train()
        with self._autocast():
          if part == "audio":
            pooled = model.audio_model(input_features=self._mel()[:, None]).pooler_output
            g_BxD = model.audio_projection(pooled)
          else:
            pooled = model.text_model(input_ids=b["input_ids"],
                                      attention_mask=b["attention_mask"]).pooler_output
            g_BxD = model.text_projection(pooled)
        model.zero_grad(set_to_none=True)
        (g_BxD.float() * r_BxD).sum().backward()
        self._sync()
    elif part == "attention":
      # HF ClapAudioSelfAttention's core on its [B*G, A, P, D] layout, forward + backward.
      blocks = attention_blocks(self.spec)
      dev, bsz = self.device, self.spec.batch
      tensors = []
      for g, a, p, d in blocks:
        qkv = [torch.randn(bsz * g, a, p, d, device=dev, requires_grad=True) for _ in range(3)]
        tensors.append((*qkv, torch.randn(a, p, p, device=dev),
                        torch.randn(bsz * g, a, p, d, device=dev)))

      def one():
        with self._autocast():
          for q, k, v, bias, ct in tensors:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            probs = torch.softmax(scores + bias[None], dim=-1)
            out = torch.matmul(probs, v)
            torch.autograd.backward(out, ct)
            q.grad = k.grad = v.grad = None
        self._sync()
    elif part in DROPOUT_PARTS:
      # The same number of dropout masks (torch's nn.Dropout draws bernoulli_ in place).
      mask = torch.empty(dropout_elements(self.spec), device=self.device)

      def one():
        mask.bernoulli_(0.9)
        self._sync()
    elif part == "optimizer":
      for p in self.params:
        p.grad = torch.full_like(p, 1e-3)

      def one():
        torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        self.opt.step()
        self._sync()
    else:
      raise ValueError(f"unknown part {part!r}")
    one()  # warm-up
    return {"times": _timed(one, n)}

  def info(self) -> dict:
    out = {"peak_rss_mb": peak_rss_mb()}
    if self.device.type == "cuda":
      import torch

      out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# The machine's matmul peak.


class PeakSystem:
  """A large square matmul in JAX (jitted) and in torch: the FLOP/s the machine delivers."""

  def __init__(self, spec: Spec):
    self.spec = spec

  def setup(self) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = self.spec.matmul_size
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = jnp.bfloat16 if self.spec.dtype == "bfloat16" else jnp.float32
    k1, k2 = jax.random.split(jax.random.key(0))
    self.x = jax.random.normal(k1, (n, n), dtype)
    self.y = jax.random.normal(k2, (n, n), dtype)
    self.matmul = jax.jit(jnp.matmul).lower(self.x, self.y).compile()
    jax.block_until_ready(self.matmul(self.x, self.y))
    self.torch_device = torch.device("cuda" if self.spec.device == "gpu" else "cpu")
    tdtype = torch.bfloat16 if self.spec.dtype == "bfloat16" else torch.float32
    self.tx = torch.randn(n, n, dtype=tdtype, device=self.torch_device)
    self.ty = torch.randn(n, n, dtype=tdtype, device=self.torch_device)
    torch.matmul(self.tx, self.ty)
    return {"flops": flops_of(self.matmul), "analytic_flops": 2.0 * n**3}

  def run(self, system: str, n: int) -> dict:
    import jax
    import torch

    if system == "jax":
      fn = lambda: jax.block_until_ready(self.matmul(self.x, self.y))  # noqa: E731
    else:
      def fn():
        torch.matmul(self.tx, self.ty)
        if self.torch_device.type == "cuda":
          torch.cuda.synchronize()
    return {"times": _timed(fn, n)}

  def info(self) -> dict:
    return {"peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------
# Workers and the interleaving driver.


def _worker_main(conn, kind: str, args: tuple):
  try:
    obj = {"jax": JaxSystem, "torch": TorchSystem, "peak": PeakSystem}[kind](*args)
    conn.send(("ok", None))
    while True:
      method, kwargs = conn.recv()
      if method == "exit":
        return
      try:
        conn.send(("ok", getattr(obj, method)(**kwargs)))
      except Exception:  # noqa: BLE001 - reported to the driver, which raises
        conn.send(("error", traceback.format_exc()))
  except Exception:  # noqa: BLE001
    conn.send(("error", traceback.format_exc()))


def worker_env(kind: str, device: str, jax_xla_flags: str = "") -> dict[str, str]:
  """Environment of a worker: one process per system, each seeing every core; the JAX workers
  get `jax_xla_flags` (Spec.jax_xla_flags) on top of the driver's XLA_FLAGS."""
  env = {}
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f]
  if kind in ("jax", "peak"):
    flags += jax_xla_flags.split()
  env["XLA_FLAGS"] = " ".join(flags)  # one CPU device with all cores (tests simulate 8)
  if kind == "torch":
    env["JAX_PLATFORMS"] = "cpu"  # the reference imports hade_jax's numpy helpers only
  if kind in ("jax", "peak"):
    env["JAX_PLATFORMS"] = "cuda" if device == "gpu" else "cpu"
    if device == "gpu":  # several workers share the GPU: no 75 % preallocation each
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


class Worker:
  """A system in a subprocess of its own; `call` runs one method there and returns its result."""

  def __init__(self, name: str, kind: str, args: tuple, device: str, jax_xla_flags: str = ""):
    self.name = name
    ctx = mp.get_context("spawn")
    self.conn, child = ctx.Pipe()
    saved = dict(os.environ)
    # spawn copies the environment at start
    os.environ.update(worker_env(kind, device, jax_xla_flags))
    try:
      self.proc = ctx.Process(target=_worker_main, args=(child, kind, args), daemon=True)
      self.proc.start()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    child.close()  # the worker holds its end: if it dies, receive() fails instead of waiting
    self._receive()

  def send(self, method: str, **kwargs):
    self.conn.send((method, kwargs))

  def _receive(self):
    try:
      status, value = self.conn.recv()
    except EOFError:
      raise RuntimeError(f"worker {self.name} died (exit code {self.proc.exitcode}); its "
                         "output above says why") from None
    if status != "ok":
      raise RuntimeError(f"worker {self.name} failed:\n{value}")
    return value

  def receive(self):
    return self._receive()

  def call(self, method: str, **kwargs):
    self.send(method, **kwargs)
    return self._receive()

  def close(self):
    if self.proc.is_alive():
      try:
        self.conn.send(("exit", {}))
      except (BrokenPipeError, OSError):
        pass
      self.proc.join(timeout=30)
    if self.proc.is_alive():
      self.proc.terminate()


def _busy_jiffies() -> int:
  """CPU time (clock ticks) the whole machine spent busy since boot, all cores (/proc/stat)."""
  fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
  user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
  return user + nice + system + irq + softirq + steal


def _own_jiffies(pids: list[int]) -> int:
  """CPU time (clock ticks) of the benchmark's own processes (utime + stime, /proc/PID/stat)."""
  total = 0
  for pid in pids:
    try:
      stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
      continue
    fields = stat.rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
  return total


class OthersMeter:
  """Share of the machine's cores that processes other than the benchmark's used meanwhile."""

  def __init__(self, pids: list[int]):
    self.pids = [os.getpid(), *pids]
    self.start()

  def start(self):
    self.t, self.busy, self.own = time.monotonic(), _busy_jiffies(), _own_jiffies(self.pids)

  def share(self) -> float:
    ticks = os.sysconf("SC_CLK_TCK") * (time.monotonic() - self.t) * (os.cpu_count() or 1)
    others = (_busy_jiffies() - self.busy) - (_own_jiffies(self.pids) - self.own)
    return max(0.0, others / ticks) if ticks > 0 else float("nan")


def summary(times: list[float]) -> dict:
  return {"median": statistics.median(times), "min": min(times), "max": max(times),
          "n": len(times)}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How many interleaved rounds, and repetitions per turn, each phase gets."""

  train_rounds: int = 4
  train_steps: int = 1  # timed steps per turn
  warmup_steps: int = 1
  embed_rounds: int = 4
  embed_reps: int = 1
  part_rounds: int = 3
  part_reps: int = 1
  matmul_reps: int = 3
  parts: tuple[str, ...] = ("audio", "attention", "dropout", "dropout_rbg", "text", "optimizer")
  pause_s: float = 0.3  # between turns: the previous system's threads go idle


def run(spec: Spec, plan: Plan, log=print) -> dict:
  """Measures everything (see the module docstring); returns a JSON-able dict."""
  t_start = time.perf_counter()
  tmp = tempfile.TemporaryDirectory(prefix="hade_bench_")
  clap_dir = str(pathlib.Path(tmp.name) / "clap")
  workers: dict[str, Worker] = {}
  res: dict[str, Any] = {"spec": dataclasses.asdict(spec), "plan": dataclasses.asdict(plan)}
  try:
    log("starting the torch worker (builds and saves the ClapModel)")
    workers["torch"] = Worker("torch", "torch", (spec, clap_dir), spec.device)
    res["torch_setup"] = workers["torch"].call("setup")
    log(f"  {res['torch_setup']}")
    log("starting the jax workers (import the weights, compile) and warming torch up")
    flags = spec.jax_xla_flags
    workers["jax"] = Worker("jax", "jax", (spec, clap_dir, "global"), spec.device, flags)
    workers["jax_full"] = Worker("jax_full", "jax", (spec, clap_dir, "full"), spec.device, flags)
    workers["peak"] = Worker("peak", "peak", (spec,), spec.device, flags)
    # Every compilation happens here, spread over the workers, before anything is timed. The
    # towers' parts run in the full-HADE worker (same towers and weights; XLA prunes the heads
    # the parts do not use), the optimizer (its parameters) and dropout in the global one.
    owner = {p: ("jax" if p == "optimizer" or p in DROPOUT_PARTS else "jax_full")
             for p in plan.parts}
    workers["jax"].send("setup", embed=True,
                        parts=tuple(p for p in plan.parts if owner[p] == "jax"))
    workers["jax_full"].send("setup", embed=False,
                             parts=tuple(p for p in plan.parts if owner[p] == "jax_full"))
    workers["torch"].send("warmup", n=plan.warmup_steps)
    workers["peak"].send("setup")
    res["jax_setup"] = workers["jax"].receive()
    res["jax_full_setup"] = workers["jax_full"].receive()
    res["torch_warmup"] = workers["torch"].receive()
    res["peak_setup"] = workers["peak"].receive()
    log(f"  setup done in {time.perf_counter() - t_start:.0f} s")

    def turn(name, method, **kwargs):
      time.sleep(plan.pause_s)
      return workers[name].call(method, **kwargs)

    # -- embeddings first: hade_jax's weights are still the imported ones (the reference's
    # embeddings of them were taken at its setup) -----------------------------------------
    # Both embed the reference's own log-mel; the front ends are compared apart.
    mel = workers["jax"].call("log_mel")
    torch_mel = workers["torch"].call("log_mel")
    ja, jt = workers["jax"].call("embeddings", mel_BxNxF=torch_mel)
    ta, tt = workers["torch"].call("reference_embeddings")
    res["check"] = embedding_check(spec, (ja, jt), (ta, tt))
    res["check"]["log_mel_max_abs_diff_db"] = float(np.abs(mel - torch_mel).max())
    log(f"  embeddings agree: {res['check']}")
    # Every round of every phase is bracketed by one JAX matmul before and one torch matmul
    # after: a round whose probes ran slow had the machine shared (see render.clean_rounds).
    probes = {"embed": [], "part": []}
    # Other processes' share of the cores during each round (from /proc: busy ticks of the
    # machine minus the benchmark's own): rounds where others took cores are marked.
    meter = OthersMeter([w.proc.pid for w in workers.values()])
    others = {"embed": [], "train": [], "part": []}

    def probe(system):
      return turn("peak", "run", system=system, n=1)["times"][0]

    emb = {f"{s}_{w}": [] for s in ("jax", "torch") for w in ("audio", "text")}
    for r in range(plan.embed_rounds):
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      meter.start()
      before = probe("jax")
      for what in ("audio", "text"):
        for s in order:
          emb[f"{s}_{what}"] += turn(s, "embed", what=what, n=plan.embed_reps)["times"]
      probes["embed"].append((before, probe("torch")))
      others["embed"].append(meter.share())
    res["embed"] = {k: summary(v) for k, v in emb.items()}
    res["embed_times"] = emb
    log(f"  embeddings timed: { {k: round(v['median'], 3) for k, v in res['embed'].items()} }")

    # -- training steps and the matmul peak, interleaved ------------------------------------
    for name in ("jax", "jax_full"):  # JAX's warm-up steps (the weights change from here on)
      workers[name].call("train", n=plan.warmup_steps)
    times = {"jax": [], "torch": [], "jax_full": [], "matmul_jax": [], "matmul_torch": []}
    last_loss, faults = {}, {"jax": [], "torch": [], "jax_full": []}
    for r in range(plan.train_rounds):
      order = ["jax", "torch", "jax_full"]
      if r % 2:
        order.reverse()
      meter.start()
      times["matmul_jax"] += turn("peak", "run", system="jax", n=plan.matmul_reps)["times"]
      for s in order:
        out = turn(s, "train", n=plan.train_steps)
        times[s] += out["times"]
        last_loss[s] = out["loss"]
        faults[s].append(out["faults"])
      times["matmul_torch"] += turn("peak", "run", system="torch", n=plan.matmul_reps)["times"]
      others["train"].append(meter.share())
      log(f"  round {r + 1}/{plan.train_rounds}: "
          + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items())
          + f"; other processes used {100 * others['train'][-1]:.0f} % of the cores")
    res["train"] = {k: summary(v) for k, v in times.items()}
    res["train_times"] = times
    res["loss"] = last_loss
    res["minor_faults_per_step"] = {k: statistics.median(v) for k, v in faults.items()}
    res["dropout_elements"] = dropout_elements(spec)
    res["memory"] = {name: w.call("info") for name, w in workers.items()}

    # -- profile: the step's parts, interleaved ---------------------------------------------
    parts = {f"{s}_{p}": [] for s in ("jax", "torch") for p in plan.parts}
    part_info = {}
    for r in range(plan.part_rounds):
      order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
      meter.start()
      before = probe("jax")
      for p in plan.parts:
        for s in order:
          out = turn(owner[p] if s == "jax" else s, "part", part=p, n=plan.part_reps)
          parts[f"{s}_{p}"] += out["times"]
          if s == "jax":
            part_info[p] = {k: out[k] for k in ("flops", "bytes", "compile_s")}
      probes["part"].append((before, probe("torch")))
      others["part"].append(meter.share())
    res["parts"] = {k: summary(v) for k, v in parts.items()}
    res["part_times"] = parts
    res["probes"] = probes
    res["others_share"] = others
    res["part_flops"] = {p: v["flops"] for p, v in part_info.items()}
    res["part_bytes"] = {p: v["bytes"] for p, v in part_info.items()}
    res["attention_matmul_flops"] = attention_flops(spec)
    res["embed_flops"] = res["jax_setup"].pop("embed_flops", None)
    res["wall_s"] = time.perf_counter() - t_start
    return res
  finally:
    for w in workers.values():
      w.close()
    tmp.cleanup()
