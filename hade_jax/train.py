"""Entry point: `python -m hade_jax.train --config=configs/clotho.py --workdir=DIR`.

Flags only (hade_jax/cli.py: the command line of every entry point); the work is
`trainer.train_and_evaluate`, which the tests call too. `--config.KEY=VALUE` overrides a field
of the config file, e.g. --config.batch_size=64 --config.data.data_dir=~/tfds. The same
command runs on every host of a TPU slice or GPU cluster: the processes join (flags
--coordinator_address/--num_processes/--process_id, the environment, Slurm, or Cloud TPU
detection; see hade_jax/distributed.py) before anything touches a device.
Errors end in one message (exit 2: command line or config, 1: while running); --verbose (or
HADE_VERBOSE=1) adds the traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from hade_jax import cli, host_memory


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_config_flag(fv, required=True, help_text="Config file, e.g. configs/clotho.py or "
                         "configs/clotho.py:ablation=tha; --config.KEY=VALUE overrides a field.")
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here; an existing "
                      "checkpoint in it is resumed.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  cli.define_distributed_flags(fv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  """Trains as the command line says (argv without the program name); returns the metrics."""
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.train")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  cli.setup_logging()
  if fv.config.keep_freed_memory:
    host_memory.keep_freed_pages()
  cli.start_distributed(fv)
  from hade_jax import trainer  # after the flags: --help and usage errors answer at once

  return trainer.train_and_evaluate(fv.config, fv.workdir)


def run() -> None:
  """The console script (setup.py); the same as `python -m` of this module."""
  cli.main_entry(main)


if __name__ == "__main__":
  run()
