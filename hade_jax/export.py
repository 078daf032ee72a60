"""Export a trained model from its training run as a portable model folder.

  python -m hade_jax.export --workdir=/tmp/hade_demo --which=best --out=/tmp/hade_model
  python -m hade_jax.export --workdir=RUN --which=480 --out=DIR --clap_hf=DIR_HF

`--out` gets a model folder (`hade_jax.model_folder`): config.json, model.safetensors (the
parameters and batch-norm statistics, no optimizer state) and the tokenizer files;
`api.Hade.load(DIR)` reads it without orbax, TFDS or Grain. `--which` picks the step: 'best'
(the best validation step; the last one when the run kept none), 'latest', or a step number.

`--clap_hf` also writes a Hugging Face `ClapModel` folder of the towers and projections
(`transformers.ClapModel.from_pretrained(DIR_HF)`), when the model is CLAP-shaped (HTS-AT +
RoBERTa with CLAP projections and the text pooler, as `init.clap` imports); otherwise the
command stops, before writing anything, with the list of what differs.

Exit status: 0 done, 2 command line (unknown flag, bad --which), 1 anything else (no
checkpoint, a damaged one, a model that is not CLAP-shaped, an --out that holds files).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

from absl import flags

from hade_jax import cli

log = logging.getLogger("hade_jax.export")


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Training workdir, checkpoints folder or step folder "
                      "(or a model folder, to re-export it).", flag_values=fv)
  flags.DEFINE_alias("checkpoint", "workdir", flag_values=fv)
  flags.DEFINE_string("which", "best", "For a workdir: 'best', 'latest' or a step number.",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "The model folder to write (absent or empty).",
                      flag_values=fv)
  flags.DEFINE_string("clap_hf", "", "Also write a Hugging Face ClapModel folder here (a "
                      "CLAP-shaped model only).", flag_values=fv)
  flags.DEFINE_string("tokenizer_dir", "", "The tokenizer folder to copy (default: the run's "
                      "config.data.tokenizer_dir).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace the model files of a non-empty --out / "
                    "--clap_hf.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)


def export(workdir: str, out: str, *, which: str = "best", clap_hf: str = "",
           tokenizer_dir: str = "", overwrite: bool = False) -> dict[str, str]:
  """Writes the model folder (and the ClapModel folder); returns {'out': ..., 'clap_hf': ...,
  'source': the step directory}."""
  from hade_jax import api  # lazily: JAX
  from hade_jax.convert import clap as convert_clap

  hade = api.Hade.load(workdir, which=which)
  if clap_hf:  # refused before anything is written
    problems = convert_clap.clap_shape_problems(hade.model.cfg)
    if problems:
      raise convert_clap.NotClapShapedError(
          f"--clap_hf: the model of {hade.checkpoint} is not CLAP-shaped, so no Hugging Face "
          "ClapModel folder can hold it (--out alone exports it):\n  " + "\n  ".join(problems))
  result = {"source": str(hade.checkpoint),
            "out": str(hade.save(out, tokenizer_dir=tokenizer_dir or None,
                                 overwrite=overwrite))}
  if clap_hf:
    result["clap_hf"] = str(hade.save_clap(clap_hf, tokenizer_dir=tokenizer_dir or None,
                                           overwrite=overwrite))
  return result


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  """Runs the command (argv without the program name); returns `export`'s result."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.export")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  from hade_jax import checkpoints  # lazily: JAX

  which = str(fv.which)
  if which not in checkpoints.paths.WHICH and not which.isdigit():
    raise cli.UsageError(f"--which={which}: expected best, latest or a step number")
  cli.setup_logging()
  result = export(fv.workdir, fv.out, which=which, clap_hf=fv.clap_hf,
                  tokenizer_dir=fv.tokenizer_dir, overwrite=fv.overwrite)
  print(f"model folder: {result['out']} (from {result['source']})")
  if "clap_hf" in result:
    print(f"Hugging Face ClapModel folder: {result['clap_hf']}")
  log.info("load it with hade_jax.api.Hade.load(%r)", str(pathlib.Path(result["out"])))
  return result


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
