"""Importers from HF-layout PyTorch checkpoints (local folders only) into hade_jax modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def import_pretrained(model, init: Mapping[str, Any]) -> list[str]:
  """The pretrained imports named in a config's `init` section, into `model` in place.

  `init.clap` (a ClapModel folder) first, then `init.audio_tower` (HTS-AT) and
  `init.text_tower` (BERT/RoBERTa), each a local HF folder; returns one report per import.
  """
  # Imported here: the converters load torch/safetensors readers that inference never needs.
  from hade_jax.convert import bert as convert_bert
  from hade_jax.convert import clap as convert_clap
  from hade_jax.convert import common
  from hade_jax.convert import htsat as convert_htsat

  reports = []
  if init.get("clap"):
    reports.append(str(convert_clap.import_clap(model, init["clap"])))
  if init.get("audio_tower"):
    _, state = common.load_hf_folder(init["audio_tower"])
    reports.append(str(convert_htsat.import_htsat(model.audio_encoder, state, prefix=None)))
  if init.get("text_tower"):
    _, state = common.load_hf_folder(init["text_tower"])
    reports.append(str(convert_bert.import_bert(model.text_encoder, state, prefix=None)))
  return reports
