"""Original HTS-AT checkpoints (Chen et al.'s code, copied by LAION-CLAP and WavCaps).

The original Swin blocks name their tensors differently from HF `ClapAudioModel` (which
LAION converted from them, and which `convert.htsat` imports). Renames, under a prefix
(`sed_model.` in the HTS-AT AudioSet `.ckpt`, `audio_branch.` in LAION-CLAP, `audio_encoder.
audio_enc.` in WavCaps):
  bn0.*                               -> batch_norm.*
  layers.i.blocks.j.norm1 / norm2     -> layers.i.blocks.j.layernorm_before / layernorm_after
  ....attn.qkv.{weight,bias}          -> ....attention.self.{query,key,value}.*   (split in 3)
  ....attn.proj                       -> ....attention.output.dense
  ....attn.relative_position_bias_table -> ....attention.self.relative_position_bias_table
  ....mlp.fc1 / mlp.fc2               -> ....intermediate.dense / output.dense
  patch_embed.*, layers.i.downsample.*, norm.*: unchanged.
Expected unused (no counterpart by design): the torchlibrosa front end (`spectrogram_extractor`,
`logmel_extractor`, WavCaps' `audio_feats_extractor`; hade_jax computes its own log-mel, and
the stored mel filterbank is checked against it), the AudioSet classifier (`tscam_conv`,
`head`), and the buffers `attn_mask`, `relative_position_index`, `num_batches_tracked`.

The geometry is read from the tensor shapes (see `htsat_config_from_state_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from hade_jax import bert, frontend, hade, htsat
from hade_jax import heads as hade_heads
from hade_jax.convert import clap as convert_clap
from hade_jax.convert import common, torch_ckpt
from hade_jax.convert import htsat as convert_htsat

HTSAT_AUDIOSET_PREFIX = "sed_model."
_HF_PREFIX = "audio_encoder."
_BLOCK_RENAMES = (
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("attn.proj.", "attention.output.dense."),
    ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_BLOCK = re.compile(r"^(layers\.\d+\.blocks\.\d+\.)(.*)$")
# Original keys (after the prefix) with no hade_jax counterpart by design.
_EXPECTED_UNUSED = re.compile(
    r"^(spectrogram_extractor|logmel_extractor|audio_feats_extractor|tscam_conv|head)\.|"
    r"(\.attn_mask|relative_position_index|num_batches_tracked)$")
# Feature fusion (LAION's `*-fused` models): extra branches hade_jax does not implement.
_FUSION = re.compile(r"^(patch_embed\.(mel_conv2d|fusion_model)|mel_conv1d|fusion_model)\.")
# The stored torchlibrosa filterbank [n_freqs, n_mels], checked against hade_jax's front end.
_FILTERBANKS = ("logmel_extractor.melW", "audio_feats_extractor.log_trans.melW")


def _rename(key: str) -> list[tuple[str, slice | None]]:
  """One original key (prefix removed) -> HF keys, with the qkv rows each one takes."""
  if key.startswith("bn0."):
    return [("batch_norm." + key[len("bn0."):], None)]
  m = _BLOCK.match(key)
  if m is None:
    return [(key, None)]
  block, rest = m.groups()
  if rest.startswith("attn.qkv."):
    leaf = rest[len("attn.qkv."):]
    return [(f"{block}attention.self.{name}.{leaf}", i) for i, name in
            enumerate(("query", "key", "value"))]
  for old, new in _BLOCK_RENAMES:
    if rest.startswith(old):
      return [(block + new + rest[len(old):], None)]
  return [(key, None)]


def original_name(hf_key: str, prefix: str) -> str:
  """The inverse of `_rename`: an HF key under `audio_encoder.` -> the original key name."""
  if not hf_key.startswith(_HF_PREFIX):
    return hf_key
  local = hf_key[len(_HF_PREFIX):]
  if local.startswith("batch_norm."):
    return prefix + "bn0." + local[len("batch_norm."):]
  local = re.sub(r"attention\.self\.(query|key|value)\.", "attn.qkv.", local)
  for old, new in _BLOCK_RENAMES:  # 'attention.output.dense.' before its suffix 'output.dense.'
    local = local.replace(new, old)
  return prefix + local


def tower_keys(tensors: Mapping[str, np.ndarray], prefix: str) -> list[str]:
  """The keys under `prefix`; raises when there are none or the tower uses fusion."""
  keys = [k for k in tensors if k.startswith(prefix)]
  if prefix + "patch_embed.proj.weight" not in tensors:
    sample = ", ".join(sorted(tensors)[:5])
    raise common.ConversionError(f"no original HTS-AT tower under {prefix!r}: "
                                 f"{prefix}patch_embed.proj.weight is missing; "
                                 f"first keys: {sample}")
  fused = [k for k in keys if _FUSION.search(k[len(prefix):])]
  if fused:
    raise common.ConversionError(
        f"the HTS-AT tower uses feature fusion ({fused[0]}), which hade_jax does not implement; "
        "use a non-fusion checkpoint (LAION-CLAP: the files without 'fusion' in their name)")
  return keys


def htsat_to_hf(tensors: Mapping[str, np.ndarray], prefix: str
                ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Renames an original HTS-AT tower to HF ClapAudioModel keys (under `audio_encoder.`).

  Returns:
    (HF key -> array, HF key -> original key, original keys expected to stay unused).
  """
  renamed, origin, unused = {}, {}, []
  for key in tower_keys(tensors, prefix):
    local = key[len(prefix):]
    if _EXPECTED_UNUSED.search(local):
      unused.append(key)
      continue
    value = np.asarray(tensors[key])
    for hf_key, part in _rename(local):
      if part is not None:
        rows = value.shape[0] // 3
        renamed[_HF_PREFIX + hf_key] = value[part * rows:(part + 1) * rows]
      else:
        renamed[_HF_PREFIX + hf_key] = value
      origin[_HF_PREFIX + hf_key] = key
  return renamed, origin, sorted(unused)


def _get(tensors: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in tensors:
    raise common.ConversionError(f"original HTS-AT checkpoint lacks {key}")
  return np.asarray(tensors[key])


def htsat_config_from_state_dict(tensors: Mapping[str, np.ndarray], prefix: str,
                                 **overrides) -> htsat.HtsatConfig:
  """An HtsatConfig read from an original HTS-AT tower's tensor shapes.

  Width, depths, heads, window, MLP ratio and mel bins come from the shapes; the image side
  (`spec_size`) from a shifted block's `attn_mask` (its window count), else HTS-AT's 256;
  `patch_stride` is taken equal to the patch size, as in every released HTS-AT. Regularisation
  follows the original code's defaults (no dropout, stochastic depth 0.1). `overrides` win.
  """
  tower_keys(tensors, prefix)
  proj = _get(tensors, prefix + "patch_embed.proj.weight")  # [C, 1, ph, pw]
  depths, heads = [], []
  while any(k.startswith(f"{prefix}layers.{len(depths)}.blocks.") for k in tensors):
    i = len(depths)
    blocks = {int(k[len(f"{prefix}layers.{i}.blocks."):].split(".")[0]) for k in tensors
              if k.startswith(f"{prefix}layers.{i}.blocks.")}
    depths.append(max(blocks) + 1)
    table = _get(tensors, f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table")
    heads.append(int(table.shape[1]))
  table = _get(tensors, f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table")
  window = (math.isqrt(int(table.shape[0])) + 1) // 2  # (2w - 1)^2 relative offsets
  width = int(proj.shape[0])
  fc1 = _get(tensors, f"{prefix}layers.0.blocks.0.mlp.fc1.weight")
  patch = (int(proj.shape[2]), int(proj.shape[3]))
  spec_size = 256
  mask_key = f"{prefix}layers.0.blocks.1.attn_mask"  # [windows, w*w, w*w] of stage 1
  if mask_key in tensors:
    spec_size = math.isqrt(int(tensors[mask_key].shape[0])) * window * patch[0]
  kwargs = dict(
      spec_size=spec_size,
      num_mel_bins=int(_get(tensors, prefix + "bn0.weight").shape[0]),
      patch_size=patch, patch_stride=patch,
      patch_embed_input_channels=int(proj.shape[1]),
      patch_embeds_hidden_size=width, depths=tuple(depths), num_attention_heads=tuple(heads),
      window_size=window, mlp_ratio=fc1.shape[0] / width,
      qkv_bias=f"{prefix}layers.0.blocks.0.attn.qkv.bias" in tensors,
      enable_patch_layer_norm=f"{prefix}patch_embed.norm.weight" in tensors,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1)
  return htsat.HtsatConfig(**(kwargs | overrides))


def check_filterbank(tensors: Mapping[str, np.ndarray], prefix: str,
                     mel: frontend.LogMelConfig, source: str) -> bool:
  """Raises when the checkpoint's stored mel filterbank differs from `mel`'s.

  Returns False when the file stores none (nothing to check), True when it matches.
  """
  for name in _FILTERBANKS:
    if prefix + name in tensors:
      stored_KxF = np.asarray(tensors[prefix + name], np.float64)
      ours_KxF = np.asarray(frontend.mel_filterbank(mel), np.float64)
      if stored_KxF.shape == ours_KxF.shape and np.allclose(stored_KxF, ours_KxF, atol=1e-6):
        return True
      raise common.ConversionError(
          f"{source}: the mel filterbank stored in {prefix + name} {stored_KxF.shape} does not "
          f"match the front end {mel} ({ours_KxF.shape}): the model was trained on other "
          "log-mels; pass the matching LogMelConfig (sample rate, n_fft, mels, f_min, f_max)")
  return False


def check_front_end(tensors: Mapping[str, np.ndarray], prefix: str, audio: htsat.HtsatConfig,
                    mel: frontend.LogMelConfig, source: str) -> None:
  """Raises unless `mel` feeds `audio` and matches the filterbank stored in the file."""
  if mel.n_mels != audio.num_mel_bins:
    raise common.ConversionError(f"{source}: the front end has {mel.n_mels} mel bins, the audio "
                                 f"tower {audio.num_mel_bins}; pass the matching LogMelConfig")
  check_filterbank(tensors, prefix, mel, source)


def _original_names(text: str, prefix: str) -> str:
  return re.sub(re.escape(_HF_PREFIX) + r"[\w.]*\w", lambda m: original_name(m[0], prefix), text)


def translate(report: common.ImportReport, prefix: str) -> common.ImportReport:
  """An ImportReport over HF keys -> the same report over the original keys (qkv once)."""
  def names(keys):
    return list(dict.fromkeys(original_name(k, prefix) for k in keys))

  missing = [_original_names(s, prefix) for s in report.missing]
  return common.ImportReport(source=report.source, loaded=names(report.loaded),
                             missing=missing, unused=names(report.unused),
                             expected_unused=names(report.expected_unused))


def import_htsat_original(model: htsat.HtsatModel, tensors: Mapping[str, np.ndarray], *,
                          prefix: str, strict: bool = True,
                          source: str = "checkpoint") -> common.ImportReport:
  """Copies an original HTS-AT tower (keys under `prefix`) into `model` in place.

  Keys outside `prefix` are not reported; the report names the original keys.
  """
  renamed, _, unused = htsat_to_hf(tensors, prefix)
  try:
    report = convert_htsat.import_htsat(model, renamed, prefix=_HF_PREFIX, strict=strict,
                                        source=source)
  except common.ConversionError as e:  # name the keys as the file does
    raise common.ConversionError(_original_names(str(e), prefix)) from None
  report = translate(report, prefix)
  report.expected_unused = sorted(set(report.expected_unused) | set(unused))
  return report


def load_htsat_audioset(path: str | pathlib.Path, *, mel: frontend.LogMelConfig | None = None,
                        seed: int = 0, **config_overrides
                        ) -> tuple[htsat.HtsatModel, frontend.LogMelConfig, common.ImportReport]:
  """Builds an HtsatModel from the original HTS-AT AudioSet checkpoint and imports it.

  Args:
    path: the Lightning `.ckpt` (`{'state_dict': {'sed_model.*': ...}}`, e.g.
      `HTSAT_AudioSet_Saved_1.ckpt`) or a `.safetensors` file with the same keys.
    mel: the front end; default HTS-AT's own (32 kHz, hop 320, 64 mels, 50-14000 Hz). It is
      checked against the filterbank stored in the file.
    seed: initialisation seed (unused when the import is complete).
    config_overrides: HtsatConfig fields to set instead of the ones read from the shapes.

  Returns:
    (model, log-mel config, import report over the original key names). The AudioSet
    classifier (`tscam_conv`, `head`) is not imported: hade_jax uses the pooled embedding.
  """
  ckpt = torch_ckpt.read(path)
  tensors = ckpt.tensors
  lightning = any(k.startswith(HTSAT_AUDIOSET_PREFIX) for k in tensors)
  prefix = HTSAT_AUDIOSET_PREFIX if lightning else ""
  cfg = htsat_config_from_state_dict(tensors, prefix, **config_overrides)
  mel = mel if mel is not None else frontend.LogMelConfig.wavcaps()
  check_front_end(tensors, prefix, cfg, mel, str(path))
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(seed))
  report = import_htsat_original(model, tensors, prefix=prefix, source=str(path))
  report.unused += sorted(k for k in tensors if not k.startswith(prefix))
  return model, mel, report


# ---------------------------------------------------------------------------------------------
# Pieces shared by the whole-model importers (convert.laion, convert.wavcaps).


def hade_config(audio: htsat.HtsatConfig, text: bert.BertConfig, embed_dim: int,
                mel: frontend.LogMelConfig, **heads_overrides) -> hade.HadeConfig:
  """A HadeConfig with CLAP-shaped (Linear-ReLU-Linear) projections around the given towers.

  The heads (levels mapped onto the text depth, CLAP projections) come from
  `convert.clap.config_from_clap`, the one owner of that choice; the towers and the front end
  are then the ones read from the checkpoint.
  """
  clap_like = {"model_type": "clap", "projection_dim": embed_dim, "audio_config": {},
               "text_config": {"model_type": text.variant, "pad_token_id": text.pad_token_id,
                               "num_hidden_layers": text.num_hidden_layers}}
  cfg = convert_clap.config_from_clap(clap_like, **heads_overrides)
  return dataclasses.replace(cfg, audio=audio, text=text, mel=mel)


def import_projection(module: hade_heads.Projection, tensors: Mapping[str, np.ndarray],
                      key_prefix: str, source: str) -> common.ImportReport:
  """`<key_prefix>.{0,2}` (torch nn.Sequential(Linear, ReLU, Linear)) -> linear1 / linear2."""
  if module.kind != "clap":
    raise common.ConversionError(f"{source}: {key_prefix} is Linear-ReLU-Linear; the model was "
                                 f"built with heads.projection={module.kind!r}")
  index = {"linear1": 0, "linear2": 2}
  return common.import_params(
      module, tensors, source=source,
      name_fn=lambda path: (f"{key_prefix}.{index[str(path[0])]}."
                            + common.default_hf_name(path[1:])))


def merge_reports(source: str, reports: list[common.ImportReport],
                  tensors: Mapping[str, np.ndarray],
                  expected: re.Pattern | None = None) -> common.ImportReport:
  """One report over a whole checkpoint: every key loaded, expected-unused or unused."""
  total = common.ImportReport(source=source)
  for r in reports:
    total.loaded += r.loaded
    total.missing += r.missing
    total.expected_unused += r.expected_unused
  seen = set(total.loaded) | set(total.expected_unused)
  rest = sorted(k for k in tensors if k not in seen)
  is_expected = (lambda k: bool(expected.search(k))) if expected is not None else (lambda k: False)
  total.expected_unused += [k for k in rest if is_expected(k)]
  total.unused = [k for k in rest if not is_expected(k)]
  return total


# ---------------------------------------------------------------------------------------------
# Text towers saved inside original checkpoints (LAION-CLAP's `text_branch.`, WavCaps'
# `text_encoder.text_encoder.`): HF BertModel/RobertaModel keys under a prefix, no config.


def text_config_from_state_dict(tensors: Mapping[str, np.ndarray], prefix: str, *, variant: str,
                                 **overrides) -> bert.BertConfig:
  """A BertConfig read from an HF BERT/RoBERTa tower's tensor shapes under `prefix`.

  The shapes give the vocabulary, width, depth, feed-forward width and the position and
  token-type tables; the number of heads is not in the shapes: it defaults to width / 64
  (every BERT/RoBERTa base and large model); pass `num_attention_heads` otherwise. The
  remaining fields (eps, pad id) follow `variant`'s preset (roberta-base / bert-base-uncased).
  """
  if variant not in bert.VARIANTS:
    raise ValueError(f"text variant must be one of {bert.VARIANTS}, got {variant!r}")
  words = tensors.get(prefix + "embeddings.word_embeddings.weight")
  if words is None:
    raise common.ConversionError(f"no text tower: {prefix}embeddings.word_embeddings.weight "
                                 "is missing")
  layer_re = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
  depth = 1 + max(int(m[1]) for k in tensors if (m := layer_re.match(k)))
  hidden = int(words.shape[1])
  def rows(name):
    if prefix + name not in tensors:
      raise common.ConversionError(f"text tower under {prefix!r} lacks {prefix + name}")
    return int(tensors[prefix + name].shape[0])

  kwargs = dict(
      vocab_size=int(words.shape[0]), hidden_size=hidden, num_hidden_layers=depth,
      num_attention_heads=max(1, hidden // 64),
      intermediate_size=rows("encoder.layer.0.intermediate.dense.weight"),
      max_position_embeddings=rows("embeddings.position_embeddings.weight"),
      type_vocab_size=rows("embeddings.token_type_embeddings.weight"),
      add_pooler=prefix + "pooler.dense.weight" in tensors)
  base = bert.BertConfig.roberta_base() if variant == "roberta" else bert.BertConfig.bert_base()
  return dataclasses.replace(base, **(kwargs | overrides))
