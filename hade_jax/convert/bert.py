"""Imports HF `BertModel` / `RobertaModel` / `ClapTextModel` weights into `bert.BertModel`.

`BertModel` paths are the keys of a bare HF model, so the rename table is the default one
(kernel -> weight, scale -> weight, embedding -> weight) plus a prefix: '' for a bare model,
'bert.' / 'roberta.' for the `*ForMaskedLM`-style checkpoints, 'text_model.' for a `ClapModel`.
Keys outside the prefix (task heads, CLAP's audio tower) are not the tower's business and are
not reported. The position/token-type id buffers some checkpoints carry (CLAP saves them,
old BERT files too) are expected-unused. Old TF-converted BERT files name LayerNorm
parameters `gamma` / `beta`; they are read as `weight` / `bias`, as HF does.

Pooler: some checkpoints have none (roberta-base, most sentence encoders trained without it).
`load_text_tower` then builds the tower without one; `import_bert` into a tower that has one
leaves it initialised and lists it in `report.missing`, or raises if told to.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping

import numpy as np
from flax import nnx

from hade_jax import bert
from hade_jax.convert import common

# Candidate prefixes, tried in order on the word-embedding key.
PREFIXES = ("", "bert.", "roberta.", "text_model.")
# A prefix that names the architecture: the tower must be built with that variant.
_PREFIX_VARIANT = {"bert.": "bert", "roberta.": "roberta", "text_model.": "roberta"}
_EXPECTED_UNUSED = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$")
_PROBE = "embeddings.word_embeddings.weight"
_POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")


def detect_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
  """The key prefix of the BERT/RoBERTa tower in an HF state dict ('' for a bare model)."""
  for prefix in PREFIXES:
    if prefix + _PROBE in state_dict:
      return prefix
  sample = ", ".join(sorted(state_dict)[:5])
  tried = ", ".join(repr(p + _PROBE) for p in PREFIXES)
  raise common.ConversionError(f"no BERT/RoBERTa text tower found: none of {tried} is a key; "
                               f"first keys: {sample}")


def has_pooler(state_dict: Mapping[str, np.ndarray], prefix: str | None = None) -> bool:
  """Whether the checkpoint holds the tower's pooler (`pooler.dense.*`)."""
  prefix = detect_prefix(state_dict) if prefix is None else prefix
  return all(prefix + k in state_dict for k in _POOLER_KEYS)


def _legacy_renamed(state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """`LayerNorm.gamma/beta` (TF-era BERT files) -> `LayerNorm.weight/bias`; no array copies."""
  if not any(k.endswith(("LayerNorm.gamma", "LayerNorm.beta")) for k in state_dict):
    return state_dict
  renamed = {}
  for k, v in state_dict.items():
    if k.endswith("LayerNorm.gamma"):
      k = k[: -len("gamma")] + "weight"
    elif k.endswith("LayerNorm.beta"):
      k = k[: -len("beta")] + "bias"
    renamed[k] = v
  return renamed


def import_bert(
    model: bert.BertModel,
    state_dict: Mapping[str, np.ndarray],
    *,
    prefix: str | None = None,
    strict: bool = True,
    allow_missing_pooler: bool = True,
    source: str = "checkpoint",
) -> common.ImportReport:
  """Copies an HF BERT/RoBERTa state dict into `model` in place.

  Args:
    model: the BertModel to fill; its config must match the checkpoint's geometry (shapes
      are checked) and variant (checked against the prefix when it names one).
    state_dict: HF key -> numpy array (PyTorch layout).
    prefix: '' (BertModel, RobertaModel, ClapTextModel), 'bert.', 'roberta.', 'text_model.'
      (ClapModel), or None to detect it.
    strict: raise ConversionError when a tensor other than the pooler has no source; else
      leave it initialised and report it missing.
    allow_missing_pooler: when the model has a pooler and the checkpoint none, keep the
      initialised pooler and list it in `report.missing` (True), or raise (False).
    source: a name for messages.

  Returns:
    The ImportReport. Keys outside `prefix` are not counted unused; id buffers are
    expected-unused; a checkpoint pooler the model lacks is unused.
  """
  state_dict = _legacy_renamed(state_dict)
  if prefix is None:
    prefix = detect_prefix(state_dict)
  variant = _PREFIX_VARIANT.get(prefix)
  if variant is not None and variant != model.cfg.variant:
    raise common.ConversionError(
        f"{source}: keys under {prefix!r} are a {variant} checkpoint but the text tower was built "
        f"with variant={model.cfg.variant!r} (its position ids would be wrong)")
  pooler_absent = model.pooler is not None and not has_pooler(state_dict, prefix)
  if pooler_absent and not allow_missing_pooler:
    raise common.ConversionError(
        f"{source} has no {prefix}pooler.dense.weight/bias but the text tower has a pooler: "
        "build it with add_pooler=False (load_text_tower does so) or pass "
        "allow_missing_pooler=True to keep an initialised pooler")
  report = common.import_params(
      model, state_dict,
      name_fn=lambda path: prefix + common.default_hf_name(path),
      source=source, strict=strict,
      allow_missing=(r"^pooler/",) if pooler_absent else (),
      consumed_prefixes=(prefix,) if prefix else (),
      expected_unused=_EXPECTED_UNUSED)
  if pooler_absent:
    report.missing += [f"pooler/dense/kernel (expected {prefix}pooler.dense.weight)",
                       f"pooler/dense/bias (expected {prefix}pooler.dense.bias)"]
    logging.warning("%s has no pooler: the text tower's pooler keeps its initialisation", source)
  return report


def load_text_tower(
    folder: str | pathlib.Path,
    *,
    add_pooler: bool | None = None,
    dtype=None,
    seed: int = 0,
) -> tuple[bert.BertModel, bert.BertConfig, common.ImportReport]:
  """Builds a BertModel from a local HF folder and imports its weights.

  The folder holds `config.json` (BertConfig, RobertaConfig, ClapTextConfig, or a ClapConfig
  whose `text_config` is used) and `model.safetensors` (or `pytorch_model.bin`, read with
  torch).

  Args:
    folder: the checkpoint folder.
    add_pooler: build a pooler; None = exactly when the checkpoint has one. True with a
      checkpoint that has none keeps an initialised pooler (listed in `report.missing`).
    dtype: compute dtype override (default float32).
    seed: initialisation seed (only matters for tensors the checkpoint does not hold).

  Returns:
    (model, config, import report).
  """
  folder = pathlib.Path(folder).expanduser()
  config, state_dict = common.load_hf_folder(folder)
  state_dict = _legacy_renamed(state_dict)
  prefix = detect_prefix(state_dict)
  overrides = {"add_pooler": has_pooler(state_dict, prefix) if add_pooler is None else add_pooler}
  if dtype is not None:
    overrides["dtype"] = dtype
  try:
    cfg = bert.BertConfig.from_hf(config, **overrides)
  except ValueError as e:
    raise common.ConversionError(f"{folder / 'config.json'}: {e}") from None
  model = bert.BertModel(cfg, rngs=nnx.Rngs(seed))
  report = import_bert(model, state_dict, prefix=prefix, source=str(folder))
  return model, cfg, report
