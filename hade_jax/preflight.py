"""What a training run reads from disk, checked before anything is built: one message for all.

The trainer calls `check` first, so that a machine without the prepared data, the tokenizer or
a pretrained tower named in the config hears about all of them at once, each with the flag or
command that provides it, instead of a traceback about the first one met.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from hade_jax import cli, data, input_pipeline

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")
INIT_KEYS = {  # config.init.<key>: what it points at
    "resume": "a checkpoint folder to start from",
    "clap": "a Hugging Face ClapModel folder (both towers)",
    "audio_tower": "a Hugging Face ClapAudioModel folder",
    "text_tower": "a Hugging Face BERT/RoBERTa folder",
}
TOWER_HINT = ("pretrained towers: none set, the towers would start from random weights; "
              "nothing is downloaded: --config.init.clap=DIR (LAION-CLAP: both towers, and "
              "--config.data.tokenizer_dir=DIR) or --config.init.text_tower=DIR / "
              "--config.init.audio_tower=DIR")


class MissingInputs(cli.UsageError, FileNotFoundError):
  """Inputs the config names are missing (the message lists every one)."""


def _has_checkpoint(workdir: str | os.PathLike | None) -> bool:
  folder = pathlib.Path(workdir).expanduser() / "checkpoints" if workdir else None
  return bool(folder and folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()))


def missing_inputs(config: ml_collections.ConfigDict,
                   workdir: str | os.PathLike | None = None) -> list[str]:
  """One line per missing input: what, where it was looked for, and how to provide it."""
  d = config.data
  problems = []
  if d.get("prepare_if_missing") and d.dataset == "folder":
    manual = pathlib.Path(d.manual_dir).expanduser()
    if not (d.manual_dir and manual.is_dir()):
      problems.append(f"your folder: config.data.manual_dir={d.manual_dir!r} is not a folder; "
                      "point it at the folder holding your audio and CSV(s)")
  elif not (d.get("prepare_if_missing") and d.dataset == "synthcaps"):
    try:
      input_pipeline.dataset_dir(pathlib.Path(d.data_dir).expanduser(), d.dataset,
                                 data.builder_config_name(config))
    except FileNotFoundError as e:
      problems.append(f"prepared data: {e}".replace("\n", "\n    "))
  if not d.tokenizer_dir:
    problems.append("tokenizer: config.data.tokenizer_dir is empty; set "
                    "--config.data.tokenizer_dir=DIR, the text tower's folder (with "
                    f"{', '.join(TOKENIZER_FILES)})")
  else:
    folder = pathlib.Path(d.tokenizer_dir).expanduser()
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
      what = "no folder" if not folder.is_dir() else f"no {' or '.join(TOKENIZER_FILES)} in"
      problems.append(f"tokenizer: {what} {folder} (--config.data.tokenizer_dir)")
  if not _has_checkpoint(workdir):  # a run that resumes its workdir reads no init paths
    for key, what in INIT_KEYS.items():
      value = config.get("init", {}).get(key)
      if value and not pathlib.Path(value).expanduser().exists():
        problems.append(f"config.init.{key}: no {pathlib.Path(value).expanduser()} ({what}; "
                        f"--config.init.{key}=DIR)")
  return problems


def check(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> None:
  """Raises `MissingInputs` listing every missing input of a training run, if any."""
  problems = missing_inputs(config, workdir)
  if not problems:
    return
  message = "cannot start training, missing:\n  - " + "\n  - ".join(problems)
  init = config.get("init", {})
  if not _has_checkpoint(workdir) and not any(init.get(k) for k in INIT_KEYS):
    message += f"\n  and {TOWER_HINT}"
  raise MissingInputs(message)
