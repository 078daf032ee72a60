"""Training: sharded steps agree, resume is exact, the demo path runs end to end.

Everything runs on a tiny synthcaps set prepared once per session (16 kHz, 1.27 s crops) and a
tiny HADE (HTS-AT with 2x2 windows, a 2-block text tower with the real MiniLM vocabulary).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from hade_jax import checkpoints, trainer
from tests.tiny_train_config import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def read_state(workdir: pathlib.Path, step: int) -> dict:
  return checkpoints.read_state(workdir / "checkpoints" / str(step))  # numpy, verified


def assert_trees_close(a, b, atol):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(flat_a) == len(flat_b)
  for path, x in flat_a:
    np.testing.assert_allclose(np.asarray(x), np.asarray(flat_b[path]), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_one_step_is_the_same_on_1_and_8_devices(tiny_data, minilm_dir, tmp_path):
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  states, losses = {}, {}
  for name, mesh in {"1": (("data", 1), ("fsdp", 1)), "8x1": (("data", 8), ("fsdp", 1)),
                     "4x2": (("data", 4), ("fsdp", 2))}.items():
    # Adam's first update is ~sign(g) * lr: with eps=1e-8 it turns float noise of the
    # reduction order in near-zero gradients into differences of order lr. A large eps makes
    # the update Lipschitz in g, so equal parameters below mean equal gradients.
    config = tiny_config(tiny_data, minilm_dir, total_steps=1, mesh=mesh,
                         final_eval_split="", best_metric="",
                         **{"optim.eps": 1e-3, "optim.warmup_epochs": 0.0})
    trainer.train_and_evaluate(config, tmp_path / name)
    states[name] = read_state(tmp_path / name, 1)
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses[name] = [x for x in lines if "train/loss" in x][-1]["train/loss"]
  assert int(states["1"]["step"]) == 1
  for name in ("8x1", "4x2"):
    assert losses[name] == pytest.approx(losses["1"], abs=1e-5)
    assert_trees_close(states[name]["params"], states["1"]["params"], atol=1e-5)
    assert_trees_close(states[name]["rest"], states["1"]["rest"], atol=1e-5)


def _run_train(workdir: pathlib.Path, overrides: dict[str, str]) -> None:
  args = [sys.executable, "-m", "hade_jax.train", f"--config={ROOT}/tests/tiny_train_config.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]


def _batches(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "batches.jsonl").read_text().splitlines()]


def test_resume_in_a_new_process_is_exact(tiny_data, minilm_dir, tmp_path):
  common = {"data.data_dir": str(tiny_data), "data.tokenizer_dir": str(minilm_dir),
            "total_steps": "6", "checkpoint_every_steps": "100", "log_batch_ids": "True",
            "eval_every_steps": "3"}
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _run_train(straight, common)
  _run_train(resumed, common | {"max_steps_per_run": "3"})
  assert (resumed / "checkpoints" / "3").is_dir() and not (resumed / "checkpoints" / "6").exists()
  _run_train(resumed, common)
  # Identical data order across the restart...
  assert _batches(straight) == _batches(resumed)
  assert [b["step"] for b in _batches(resumed)] == list(range(1, 7))
  # ...and identical parameters, optimizer state and batch-norm statistics.
  a, b = read_state(straight, 6), read_state(resumed, 6)
  assert_trees_close(a, b, atol=0)
  # The run evaluated, kept the best step, and evaluated it on the test split.
  metrics = json.loads((resumed / "test_metrics.json").read_text())
  assert set(metrics["metrics"]) >= {"t2a/R@1", "a2t/mAP@10", "global/t2a/R@10",
                                    "two_stage@50/t2a/R@10/lost", "two_stage@100/t2a/R@10/lost"}
  assert len(metrics["clips"]) == 6
  assert (resumed / "best").is_dir()
  lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert any("val/t2a/R@1" in x for x in lines) and any("train/loss" in x for x in lines)
  assert list((resumed / "tensorboard").glob("events.*"))


def test_missing_dataset_fails_at_once_with_the_prepare_command(tmp_path):
  from configs import clotho

  config = clotho.get_config()
  config.data.data_dir = str(tmp_path / "nothing_here")
  config.data.tokenizer_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    trainer.train_and_evaluate(config, tmp_path / "wd")
  message = str(e.value)
  assert str(tmp_path / "nothing_here" / "clotho" / "48k") in message
  assert "dataset_info.json" in message
  assert "python -m data_pipelines.prepare --dataset=clotho" in message
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_frozen_group_bf16_and_accumulation(tiny_data, minilm_dir, tmp_path):
  """bfloat16 compute and 2-step accumulation train; a frozen group never moves."""
  config = tiny_config(
      tiny_data, minilm_dir, total_steps=4, final_eval_split="", best_metric="",
      compute_dtype="bfloat16",
      **{"optim.accum_steps": 2, "optim.warmup_epochs": 0.0,
         "optim.groups": (("^text_encoder/", "text"), (".*", "rest")),
         "optim.lr": base.ml_collections.ConfigDict({"text": 1e-3, "rest": 1e-3}),
         "optim.weight_decay": base.ml_collections.ConfigDict({"text": 0.1, "rest": 0.1}),
         "optim.frozen": ("text",)})
  trainer.train_and_evaluate(config, tmp_path / "wd")
  first, last = read_state(tmp_path / "wd", 2), read_state(tmp_path / "wd", 4)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       first["params"], last["params"])
  assert not any(jax.tree.leaves(moved["text_encoder"]))
  assert all(jax.tree.leaves(moved["heads"]))
  lines = [json.loads(x) for x in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)


def test_train_state_keeps_the_checkpoint_layout_of_the_dict_state(tmp_path):
  """A TrainState is saved with the item names the untyped dict had (step, params/..., rest/...,
  opt_state/0/mu/...), and either form restores into the other."""
  import jax.numpy as jnp
  import optax

  from hade_jax import checkpoints, train_state

  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  tx = optax.adamw(1e-3)
  state = train_state.TrainState(step=jnp.array(5, jnp.int32), params=params,
                                 rest={"mean": jnp.zeros(2)}, opt_state=tx.init(params))
  as_dict = {"step": state.step, "params": state.params, "rest": state.rest,
             "opt_state": state.opt_state}
  assert checkpoints.state_checksums(state) == checkpoints.state_checksums(as_dict)
  assert "opt_state/0/mu/w" in checkpoints.state_checksums(state)
  for name, saved in (("typed", state), ("dict", as_dict)):
    ckpt = checkpoints.Checkpoints(tmp_path / name, keep=1, best_metric=None)
    ckpt.save(5, saved, None, {"step": 5})
    ckpt.wait()
    ckpt.close()
    assert set(read_state(tmp_path / name, 5)) == {"step", "params", "rest", "opt_state"}
    step, restored = checkpoints.restore_state(tmp_path / name / "checkpoints",
                                               jax.eval_shape(lambda: state))
    assert step == 5 and isinstance(restored, train_state.TrainState)
    assert_trees_close(restored, state, atol=0)


def _dropout_masks(impl: str, seed: int, step: int, x_BxD, sharding=None):
  """layers.dropout under jit, keyed as the training step keys it (`config.dropout_rng`)."""
  from flax import nnx

  from hade_jax import layers

  def masked(seed, x_BxD):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl=impl), 1), step)
    return layers.dropout(x_BxD, 0.5, nnx.Rngs(dropout=key))

  fn = jax.jit(masked, in_shardings=(None, sharding), out_shardings=sharding)
  return np.asarray(fn(seed, x_BxD))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_rng_draws_the_same_masks_on_1_and_8_devices(impl):
  from hade_jax import config_schema, sharding

  assert impl in config_schema.DROPOUT_RNGS
  mesh = sharding.make_mesh((("data", 8), ("fsdp", 1)))
  # 16 x 4096: large enough for layers.keep_mask's chunked loop (threefry), which the mesh
  # partitions over the batch.
  x_BxD = np.ones((16, 4096), np.float32)
  one = _dropout_masks(impl, 3, 5, x_BxD, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  eight = _dropout_masks(impl, 3, 5, x_BxD, sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(one, eight)
  assert 0.3 < (one == 0).mean() < 0.7
  # A resumed run draws a step's masks from (seed, step) alone: the same again, another step
  # (or seed) others.
  np.testing.assert_array_equal(_dropout_masks(impl, 3, 5, x_BxD), one)
  assert (_dropout_masks(impl, 3, 6, x_BxD) != one).any()
  assert (_dropout_masks(impl, 4, 5, x_BxD) != one).any()


def test_dropout_rng_reaches_the_training_step():
  """config.dropout_rng is the PRNG of the step's masks: the step's random bits are drawn
  from keys of that implementation (`key<rbg>`), and of no other."""
  from flax import nnx

  from hade_jax import hade, optim, train_state

  config = tiny_config(**{"data.spec_augment": False})
  model = hade.HadeModel(hade.model_config(config), rngs=nnx.Rngs(0))
  graphdef, params, _ = hade.split_model(model)
  tx = optim.make(params, config.optim, total_steps=4, warmup_steps=0)
  state = train_state.TrainState.create(model, tx)
  b, m, samples = 2, config.data.max_text_len, 20320
  batch = {"audio": np.zeros((b, samples), np.float32), "input_ids": np.ones((b, m), np.int32),
           "attention_mask": np.ones((b, m), np.int32), "clip_id": np.arange(b, dtype=np.int32)}
  jaxprs = {}
  for impl in ("threefry2x32", "rbg"):
    config.dropout_rng = impl
    step = trainer.train_step_of_config(config, graphdef, tx)
    jaxprs[impl] = str(jax.make_jaxpr(step)(trainer.step_seed(config), state, batch))
  # Every key in the step is of the configured implementation (jaxprs spell threefry 'fry').
  assert set(re.findall(r"key<(\w+)>", jaxprs["rbg"])) == {"rbg"}
  assert set(re.findall(r"key<(\w+)>", jaxprs["threefry2x32"])) == {"fry"}


def test_a_frozen_group_gets_no_backward_and_the_same_update():
  """With the text tower a frozen group (as the demo's), the step train_step_of_config builds
  takes no gradient of it: fewer FLOPs than the step that differentiates everything (and whose
  optimizer then zeroes the frozen gradients), by at least the text tower's forward FLOPs, the
  same loss and gradients of the parameters that train (to float32 rounding)."""
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from hade_jax import hade, losses, optim, train_state

  config = tiny_config(**{
      "data.spec_augment": False, "optim.groups": (("^text_encoder/", "text"), (".*", "rest")),
      "optim.lr": base.ml_collections.ConfigDict({"text": 0.0, "rest": 1e-3}),
      "optim.weight_decay": base.ml_collections.ConfigDict({"text": 0.0, "rest": 0.01}),
      "optim.frozen": ("text",)})
  model = hade.HadeModel(hade.model_config(config), rngs=nnx.Rngs(0))
  graphdef, params, _ = hade.split_model(model)
  mask = optim.frozen_mask(params, config.optim)
  assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
  # Plain SGD at rate 1 (frozen: no update), so a step moves each parameter by -gradient.
  tx = optax.multi_transform({"text": optax.set_to_zero(), "rest": optax.sgd(1.0)},
                             optim.group_labels(params, config.optim.groups))
  state = train_state.TrainState.create(model, tx)
  b, m, samples = 2, config.data.max_text_len, 20320
  rs = np.random.RandomState(0)
  batch = {"audio": rs.randn(b, samples).astype(np.float32),
           "input_ids": rs.randint(5, 100, size=(b, m)).astype(np.int32),
           "attention_mask": np.ones((b, m), np.int32), "clip_id": np.arange(b, dtype=np.int32)}
  seed = trainer.step_seed(config)
  steps = {"skips": trainer.train_step_of_config(config, graphdef, tx),
           "differentiates": trainer.make_train_step(
               graphdef, tx, losses.LossConfig(**config.loss.to_dict()), False)}
  moved, flops, loss = {}, {}, {}
  for name, step in steps.items():
    compiled = jax.jit(step).lower(seed, state, batch).compile()
    flops[name] = compiled.cost_analysis()["flops"]
    new_state, step_metrics = compiled(seed, jax.tree.map(jnp.copy, state), batch)
    moved[name] = [np.asarray(new) - np.asarray(old) for new, old in
                   zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params),
                       strict=True)]
    loss[name] = float(step_metrics["loss"])

  def text_forward(params, rest):
    return nnx.merge(graphdef, params, rest).encode_text(batch["input_ids"],
                                                         batch["attention_mask"])
  text_flops = jax.jit(text_forward).lower(state.params, state.rest).compile().cost_analysis()
  assert flops["differentiates"] - flops["skips"] >= text_flops["flops"] > 0
  # XLA may fuse and order sums differently once the text branch is gone (the demo's and
  # ESC-50's steps came out bit for bit): loss and gradients agree to float32 rounding.
  assert loss["skips"] == pytest.approx(loss["differentiates"], rel=1e-5)
  largest = max(float(np.abs(g).max()) for g in moved["differentiates"])
  assert largest > 0
  for new, old, frozen in zip(moved["skips"], moved["differentiates"], jax.tree.leaves(mask),
                              strict=True):
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-5 * largest)
    assert not frozen or not new.any()


def test_dropout_rng_outside_its_choices_is_refused_by_name():
  from hade_jax import config_schema

  with pytest.raises(ValueError, match=r"dropout_rng.*'unsafe_rbg' is not one of "
                     r"'threefry2x32', 'rbg'"):
    config_schema.TrainConfig(dropout_rng="unsafe_rbg")
