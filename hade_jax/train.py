"""Entry point: `python -m hade_jax.train --config=configs/clotho.py --workdir=DIR`.

Flags only; the work is `trainer.train_and_evaluate`, which the tests call too. The same
command runs on every host of a TPU slice or GPU cluster: `distributed.initialize` joins the
processes (flags --coordinator_address/--num_processes/--process_id, the environment, Slurm,
or Cloud TPU detection; see hade_jax/distributed.py) before anything touches a device.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from hade_jax import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/clotho.py or configs/clotho.py:ablation=tha.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here; an "
                               "existing checkpoint in it is resumed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  distributed.initialize()
  distributed.quiet_other_processes()
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
