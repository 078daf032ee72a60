"""Inference does not import training: `hade_jax.api` loads no trainer, optimizer or input
pipeline (nor TFDS and Grain behind them), so embedding and search start fast and need none of
the training dependencies."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

TRAINING_MODULES = ("hade_jax.trainer", "hade_jax.optim", "hade_jax.input_pipeline",
                    "hade_jax.data", "tensorflow_datasets", "grain")


def test_importing_the_api_loads_no_training_module():
  code = ("import sys, hade_jax.api; "
          f"print(sorted(m for m in {TRAINING_MODULES!r} if m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", f"import hade_jax.api loaded {out.stdout.strip()}"
