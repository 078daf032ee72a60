"""Imports HF `ClapAudioModel` / `ClapModel` (non-fusion HTS-AT) weights into `HtsatModel`.

`HtsatModel` paths are the HF keys under `audio_encoder.`, so the rename table is the default
one (kernel -> weight, scale -> weight, mean/var -> running_mean/var) plus the prefix. The HF
buffers `relative_position_index` (rebuilt as a constant) and `num_batches_tracked` have no
counterpart and are reported as expected-unused.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np
from flax import nnx

from hade_jax import frontend, htsat
from hade_jax.convert import common

# Prefix of the audio tower in a ClapModel and in a ClapAudioModel checkpoint, most specific
# first (a ClapModel's keys also contain "audio_encoder.").
_PREFIXES = ("audio_model.audio_encoder.", "audio_encoder.")
_EXPECTED_UNUSED = (r"\.relative_position_index$", r"\.num_batches_tracked$")


def detect_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
  """The key prefix of the HTS-AT tower in a ClapModel or ClapAudioModel state dict."""
  for prefix in _PREFIXES:
    if any(k.startswith(prefix + "patch_embed.") for k in state_dict):
      return prefix
  sample = ", ".join(sorted(state_dict)[:5])
  raise common.ConversionError(
      "no HTS-AT tower found: expected keys starting with 'audio_model.audio_encoder.patch_embed.'"
      f" (ClapModel) or 'audio_encoder.patch_embed.' (ClapAudioModel); first keys: {sample}")


def import_htsat(
    model: htsat.HtsatModel,
    state_dict: Mapping[str, np.ndarray],
    *,
    prefix: str | None = None,
    strict: bool = True,
    source: str = "checkpoint",
) -> common.ImportReport:
  """Copies an HF HTS-AT state dict into `model` in place.

  Args:
    model: the HtsatModel to fill (its config must match the checkpoint's geometry).
    state_dict: HF key -> numpy array (PyTorch layout).
    prefix: 'audio_encoder.' (ClapAudioModel), 'audio_model.audio_encoder.' (ClapModel), or
      None to detect it.
    strict: raise ConversionError when a model tensor has no source; else report it missing.
    source: a name for messages.

  Returns:
    The ImportReport; keys outside `prefix` (text tower, projections) are not counted unused.
  """
  if prefix is None:
    prefix = detect_prefix(state_dict)
  return common.import_params(
      model, state_dict,
      name_fn=lambda path: prefix + common.default_hf_name(path),
      source=source, strict=strict, consumed_prefixes=(prefix,),
      expected_unused=_EXPECTED_UNUSED)


def load_clap_audio(
    folder: str | pathlib.Path,
    *,
    dtype=None,
    seed: int = 0,
) -> tuple[htsat.HtsatModel, frontend.LogMelConfig, common.ImportReport]:
  """Builds an HtsatModel from a local HF CLAP folder and imports its audio tower.

  Reads `config.json` (ClapConfig or ClapAudioConfig), `model.safetensors` (or
  `pytorch_model.bin`) and, when present, `preprocessor_config.json` for the front end (else
  the LAION-CLAP preset with the model's mel-bin count).

  Args:
    folder: the checkpoint folder.
    dtype: compute dtype override (default float32).
    seed: initialisation seed (only matters for tensors a non-strict import leaves out).

  Returns:
    (model, log-mel config, import report).
  """
  folder = pathlib.Path(folder).expanduser()
  config, state_dict = common.load_hf_folder(folder)
  overrides = {} if dtype is None else {"dtype": dtype}
  cfg = htsat.HtsatConfig.from_hf(config, **overrides)
  model = htsat.HtsatModel(cfg, rngs=nnx.Rngs(seed))
  report = import_htsat(model, state_dict, source=str(folder))
  pre_path = folder / "preprocessor_config.json"
  if pre_path.is_file():
    pre = json.loads(pre_path.read_text(encoding="utf-8"))
    # A ClapProcessor file nests the feature extractor's fields under "feature_extractor".
    mel_cfg = frontend.LogMelConfig.from_hf(pre.get("feature_extractor", pre))
  else:
    mel_cfg = frontend.LogMelConfig(n_mels=cfg.num_mel_bins)
  if mel_cfg.n_mels != cfg.num_mel_bins:
    raise common.ConversionError(
        f"{pre_path} gives {mel_cfg.n_mels} mel bins but the model expects {cfg.num_mel_bins}")
  return model, mel_cfg, report
