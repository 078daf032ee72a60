"""Training loop: `train_and_evaluate(config, workdir)`.

One function cut into labelled sections, in the order they run (the longer ones call the
helpers below it, which share the run's fixed pieces through `_Run`):
  mesh -> data -> model & optimizer -> shard & init -> restore -> step -> evals -> loop.

Resume order (first that applies):
  1. the newest valid checkpoint in `workdir/checkpoints` (state + Grain iterator: the run
     continues exactly; a damaged newest one is skipped with a warning, see `checkpoints`);
  2. `config.init.resume` (a checkpoint directory: state only, data order starts afresh);
  3. pretrained imports named in `config.init` (text tower, audio tower, ClapModel);
  4. scratch (`config.seed`).

Faults (tests/test_reliability.py, RELIABILITY.md): a killed run reruns with the same command
and ends bit-identical to an uninterrupted one. A non-finite loss, gradient or updated parameters
stops the run (NonFiniteError, naming the steps) before anything of that step is saved, or,
with `config.skip_nonfinite_steps`, the step leaves the state as it was and is counted.

Legend: B: global batch, S: samples, M: words.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hade_jax import (
    checkpoints,
    config_change,
    convert,
    data,
    evaluator,
    hade,
    input_pipeline,
    locking,
    losses,
    metrics,
    optim,
    preemption,
    preflight,
    sharding,
    test_results,
    train_state,
    validation,
)

log = logging.getLogger("hade_jax")


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/Inf."""


# ---------------------------------------------------------------------------------------------
# The jitted steps.


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_cfg: losses.LossConfig,
                    spec_augment: bool, skip_nonfinite: bool = False,
                    dropout_rng: str = "threefry2x32", frozen_of: Callable | None = None):
  """A pure function (seed, state, batch) -> (state, metrics), compiled once by the caller.

  The seed (an int32 scalar, `step_seed`) is an argument, not a constant of the program, so
  that runs differing only in `config.seed` (an ablation's seeds) share one compiled step.

  metrics["finite"] says whether the loss, the gradient norm, the updated parameters and the
  batch-norm statistics are all finite (finite moments follow, see below); with
  `skip_nonfinite` a step where they are not keeps the old parameters, optimizer
  state and batch-norm statistics (only the step counter advances, with the data).
  `dropout_rng` is the PRNG implementation of the dropout masks
  (`config_schema.DROPOUT_RNGS`, `config.dropout_rng`). `frozen_of(params)` (optional) is the
  pytree of bools of the parameters the optimizer never updates (`optim.frozen_mask`): the
  step takes no gradient of them, so a frozen tower runs forward only (its backward was work
  whose result the optimizer zeroed); their gradients are zeros, in `grad_norm` too.
  """

  def train_step(seed: jax.Array, state: train_state.TrainState, batch: dict[str, jax.Array]):
    # The key feeds dropout alone (nnx.Rngs(dropout=...) below), so its implementation is the
    # dropout masks' PRNG.
    base_rng = jax.random.fold_in(jax.random.key(seed, impl=dropout_rng), 1)
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params, rest):
      if frozen_of is not None:
        params = jax.tree.map(lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
                              params, frozen_of(params))
      # Fresh Variables (copy=True) belong to this trace, so the batch norm may update them.
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.train()  # HTS-AT's input batch norm uses (and updates) batch statistics
      rngs = nnx.Rngs(dropout=rng)
      transform = None
      if spec_augment:
        def transform(mel_BxNxF):
          # Masked cells take each clip's mean log-mel (the tower's batch norm comes after).
          mean_Bx1x1 = mel_BxNxF.mean(axis=(1, 2), keepdims=True)
          return input_pipeline.apply_spec_augment(
              mel_BxNxF - mean_Bx1x1, batch["specaug_time"], batch["specaug_freq"]) + mean_Bx1x1
      a = model.encode_audio(batch["audio"], rngs=rngs, mel_transform=transform)
      t = model.encode_text(batch["input_ids"], batch["attention_mask"], rngs=rngs)
      # Positives: same clip, or same class in a labels folder (clip_id stays for logging).
      loss, step_metrics = losses.hade_loss(model.heads, a, t,
                                            input_pipeline.positive_ids(batch), loss_cfg)
      return loss, (step_metrics, hade.split_model(model)[2])

    (_, (step_metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.rest)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step_metrics["grad_norm"] = optax.global_norm(grads)
    # The optimizer state needs no check of its own (it is 2x the parameters' bytes, read
    # every step): the gradient norm is finite iff every gradient and every squared gradient
    # is (a square that overflows makes the sum of squares inf), and Adam's moments are convex
    # combinations of finite moments and those. The parameters (p + update) and the batch-norm
    # statistics (a few numbers) are checked.
    finite = (jnp.isfinite(step_metrics["loss"]) & jnp.isfinite(step_metrics["grad_norm"])
              & _all_finite((params, rest)))
    step_metrics["finite"] = finite
    if skip_nonfinite:
      # Where(True, new, old) is `new` bit for bit: finite steps are the normal step.
      params, rest, opt_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), (params, rest, opt_state),
          (state.params, state.rest, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, rest=rest,
                              opt_state=opt_state)
    return new_state, step_metrics

  return train_step


def train_step_of_config(config: ml_collections.ConfigDict, graphdef,
                         tx: optax.GradientTransformation):
  """`make_train_step` as `config` asks for it (loss, SpecAugment, non-finite policy, dropout
  PRNG, no gradients of `config.optim.frozen` groups): the step `train_and_evaluate` runs,
  for the trainer and the benchmarks alike; its first argument is `step_seed(config, mesh)`."""
  loss_cfg = losses.LossConfig(**config.loss.to_dict())
  optim_cfg = optim.optim_config(config.optim)
  return make_train_step(graphdef, tx, loss_cfg, bool(config.data.spec_augment),
                         skip_nonfinite=bool(config.skip_nonfinite_steps),
                         dropout_rng=config.dropout_rng,
                         frozen_of=(functools.partial(optim.frozen_mask, config=optim_cfg)
                                    if optim_cfg.frozen else None))


def step_seed(config: ml_collections.ConfigDict, mesh=None) -> jax.Array:
  """`config.seed` as the training step's first argument (replicated over `mesh`)."""
  value = np.asarray(config.seed, np.int32)
  if mesh is None:
    return jnp.asarray(value)
  return jax.make_array_from_callback((), sharding.replicated(mesh), lambda _: value)


def _all_finite(tree) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def rsum(m: dict[str, float], prefix: str) -> dict[str, float]:
  out = {}
  for d in ("t2a", "a2t"):
    out[f"{prefix}/{d}/R@1+R@5+R@10"] = sum(m[f"{d}/R@{k}"] for k in (1, 5, 10))
  return out


# ---------------------------------------------------------------------------------------------


def _exclusive_and_preemptible(train_fn):
  """One run per workdir (hade_jax/locking.py) and clean stops on SIGTERM/SIGINT
  (hade_jax/preemption.py) around `train_fn(config, workdir)`."""

  @functools.wraps(train_fn)
  def wrapper(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    # Every bad field and every missing input at once, before the lock creates the workdir.
    validation.validate_config(config)
    preflight.check(config, workdir)  # data, tokenizer, pretrained towers
    with locking.exclusive(workdir, "training"), preemption.Handler():
      return train_fn(config, workdir)

  return wrapper


@_exclusive_and_preemptible
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path
                       ) -> dict[str, float]:
  """Trains per `config` in `workdir`, resuming whatever is there; returns the final metrics.

  Raises:
    locking.LockedError: another run holds the workdir (named in the message).
    config_change.ConfigChangeError: the workdir's checkpoint was saved with another model (or,
      unless config.allow_config_change, another seed/optimizer/loss/training data).
    preemption.Preempted: a SystemExit with status 143 (SIGTERM) or 130 (SIGINT), raised after
      the checkpoint of the step reached is saved; rerunning resumes from it exactly.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  config_dict = config.to_dict()

  # == Mesh ===================================================================================
  mesh = sharding.make_mesh(config.mesh)
  local_batch = _local_batch_size(config, mesh)

  # == Data ===================================================================================
  cfg = hade.model_config(config)
  source = data.open_dataset(config, cfg)
  total_steps, warmup_steps = _schedule_steps(config, source)
  train_iter = data.TrainIterator(config, source, local_batch)

  # == Model & optimizer ======================================================================
  def create_model():
    return hade.HadeModel(cfg, rngs=nnx.Rngs(config.seed))

  graphdef, abstract_params, _ = hade.split_model(nnx.eval_shape(create_model))
  tx = optim.make(abstract_params, config.optim, total_steps=total_steps,
                  warmup_steps=warmup_steps)

  # == Shard & init ===========================================================================
  run = _shard(config, workdir, mesh, source, total_steps, warmup_steps, graphdef, tx,
               create_model, resolved=dict(config_dict, total_steps_resolved=total_steps))

  # == Restore ================================================================================
  ckpt = checkpoints.Checkpoints(
      workdir, keep=config.keep_checkpoints, best_metric=config.best_metric or None,
      frozen_params=optim.frozen_mask(abstract_params, config.optim))
  _check_config_change(ckpt, config_dict, config)
  restored = ckpt.restore_latest(run.abstract_state, train_iter.checkpointable)
  start_step, state, counters = _restore_or_init(run, ckpt, restored)

  # == Step ===================================================================================
  step_fn = jax.jit(
      train_step_of_config(config, graphdef, tx),
      in_shardings=(sharding.replicated(mesh), run.state_sharding,
                    sharding.batch_sharding(mesh)),
      out_shardings=(run.state_sharding, sharding.replicated(mesh)),
      donate_argnums=(1,))
  # "compiling the training step..." / "compiled in N s"; called as step_fn(state, batch).
  step_fn = _log_first_call(functools.partial(step_fn, step_seed(config, mesh)))

  # == Evals ==================================================================================
  writer = MetricWriter(workdir, start_step) if run.is_main else None
  evals = _Evals(run, ckpt, writer)

  # == Loop ===================================================================================
  step, state, last_val = _train_loop(run, ckpt, evals, train_iter, step_fn, start_step, state,
                                      counters, resumed=restored is not None)
  return _finish(run, ckpt, evals, step, state, last_val)


@dataclasses.dataclass(frozen=True)
class _Run:
  """The pieces of one run that the sections after "shard & init" share."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  is_main: bool  # process 0: the one that logs and writes metric files
  mesh: jax.sharding.Mesh
  source: data.Dataset
  total_steps: int
  warmup_steps: int
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  create_model: Callable[[], hade.HadeModel]
  abstract_state: train_state.TrainState  # carries `state_sharding`: restores land on the mesh
  state_sharding: train_state.TrainState  # a NamedSharding per leaf
  resolved: dict  # the config saved with every checkpoint

  def init_from_scratch(self) -> train_state.TrainState:
    # Parameters are created already sharded: the init runs under jit with out_shardings.
    return jax.jit(lambda: train_state.TrainState.create(self.create_model(), self.tx),
                   out_shardings=self.state_sharding)()


def _local_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  """This process's share of `config.batch_size`, which must divide over the mesh."""
  batch_axes = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))
  if config.batch_size % batch_axes:
    raise ValueError(f"config.batch_size={config.batch_size} does not divide over the "
                     f"{batch_axes} devices of the mesh's data x fsdp axes {dict(mesh.shape)}")
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={config.batch_size} does not divide over "
                     f"{jax.process_count()} processes")
  return config.batch_size // jax.process_count()


def _schedule_steps(config: ml_collections.ConfigDict, source: data.Dataset) -> tuple[int, int]:
  """(total_steps, warmup_steps), epochs converted with the training split's size."""
  steps_per_epoch = max(1, source.num_train_clips // config.batch_size)
  total_steps = (config.total_steps if config.total_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
  return total_steps, warmup_steps


def _shard(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: jax.sharding.Mesh,
           source: data.Dataset, total_steps: int, warmup_steps: int, graphdef,
           tx: optax.GradientTransformation, create_model, resolved: dict) -> _Run:
  """The abstract train state and its shardings over `mesh` (by `config.sharding_rules`)."""
  abstract_state = train_state.TrainState.abstract(create_model, tx)
  state_sharding = sharding.state_shardings(abstract_state, config.sharding_rules, mesh)
  # Restores land on this mesh, whatever mesh and number of processes saved the checkpoint.
  abstract_state = sharding.with_shardings(abstract_state, state_sharding)
  return _Run(config=config, workdir=workdir, is_main=jax.process_index() == 0, mesh=mesh,
              source=source, total_steps=total_steps, warmup_steps=warmup_steps,
              graphdef=graphdef, tx=tx, create_model=create_model, abstract_state=abstract_state,
              state_sharding=state_sharding, resolved=resolved)


def _restore_or_init(run: _Run, ckpt: checkpoints.Checkpoints, restored
                     ) -> tuple[int, train_state.TrainState, dict[str, int]]:
  """(start_step, state, counters) in the resume order of the module docstring."""
  config = run.config
  counters = {"skipped_steps": 0, "consecutive_skips": 0}
  if restored is not None:  # 1. the workdir's own checkpoint: state and data position
    start_step, state = restored.step, restored.state
    state = jax.device_put(state, run.state_sharding)
    _check_same_global_batch(ckpt, start_step, restored.config.get("batch_size"),
                             config.batch_size)
    counters |= {k: int(v) for k, v in restored.counters.items() if k in counters}
    log.info("resumed from %s at step %d", ckpt.last.directory, start_step)
  elif config.init.resume:  # 2. another run's checkpoint: state only
    start_step, state = checkpoints.restore_state(config.init.resume, run.abstract_state)
    state = jax.device_put(state.replace(step=jnp.zeros((), jnp.int32)), run.state_sharding)
    start_step = 0
    log.info("initialised from checkpoint %s", config.init.resume)
  else:  # 4. scratch, then 3. the pretrained imports over it
    start_step = 0
    state = run.init_from_scratch()
    if any(config.init.get(k) for k in ("clap", "audio_tower", "text_tower")):
      model = nnx.merge(run.graphdef, sharding.to_host(state.params),
                        sharding.to_host(state.rest))
      for report in convert.import_pretrained(model, config.init):
        log.info("%s", report)
      state = jax.device_put(train_state.TrainState.create(model, run.tx), run.state_sharding)
  return start_step, state, counters


class _Evals:
  """Validation during training, the best checkpoint and the final test evaluation."""

  def __init__(self, run: _Run, ckpt: checkpoints.Checkpoints, writer: MetricWriter | None):
    self.run, self.ckpt, self.writer = run, ckpt, writer
    # One evaluator for the run: it compiles its encoders once, later evaluations load weights.
    self.retrieval_eval = evaluator.RetrievalEvaluator.from_config(
        run.config, shortlists=run.config.eval_shortlists)
    self.eval_split = None  # read at the first evaluation

  def due(self, step: int) -> bool:
    config = self.run.config
    return bool(config.eval_every_steps and step % config.eval_every_steps == 0
                ) or step == self.run.total_steps

  def run_eval(self, step: int, state) -> dict[str, float]:
    run = self.run
    if self.eval_split is None:
      self.eval_split = data.eval_split(run.config, run.source, run.config.data.eval_split,
                                        max_clips=run.config.eval_max_clips)
    m = self.retrieval_eval.evaluate(_eval_model(run.graphdef, state, run.mesh),
                                     self.eval_split).metrics
    out = {f"val/{k}": v for k, v in m.items()} | rsum(m, "val")
    if self.writer:
      self.writer.write(step, out)
      log.info("step %d validation (%d clips):\n%s", step, len(self.eval_split.clip_ids),
               metrics.format_table(m))
    return out

  def evaluate_and_offer_best(self, step: int, state) -> dict[str, float]:
    self.ckpt.wait()
    val = self.run_eval(step, state)
    if self.ckpt.save_best(step, state, self.run.resolved, val):
      log.info("step %d is the new best by %s = %.2f", step, self.run.config.best_metric,
               val[self.run.config.best_metric])
    return val

  def test(self, step: int, state) -> dict[str, float]:
    """Final evaluation of the best checkpoint on the test split (if the config names one)."""
    run, config = self.run, self.run.config
    if not (config.final_eval_split and config.final_eval_split in run.source.splits):
      return {}
    best_dir = run.workdir / "best"
    if self.ckpt.best is not None and self.ckpt.best.latest_step() is not None:
      _, best_state = checkpoints.restore_state(best_dir, run.abstract_state)
    else:
      best_state = state
    split = data.eval_split(config, run.source, config.final_eval_split)
    scored = self.retrieval_eval.evaluate(_eval_model(run.graphdef, best_state, run.mesh),
                                          split)
    m = scored.metrics
    if self.writer:
      self.writer.write(step, {f"test/{k}": v for k, v in m.items()})
      # Per-query ranks beside the metrics: multi-seed comparisons resample the test queries.
      test_results.write(run.workdir, split=config.final_eval_split, clips=split.clip_names,
                         caption_clip=split.caption_clip, values=m,
                         ranks=scored.query_ranks(), clip_group=split.clip_group)
      log.info("test split %r (%d clips, %d captions), best checkpoint:\n%s",
               config.final_eval_split, len(split.clip_ids), len(split.caption_clip),
               metrics.format_table(m))
    return {f"test/{k}": v for k, v in m.items()}


def _train_loop(run: _Run, ckpt: checkpoints.Checkpoints, evals: _Evals,
                train_iter: data.TrainIterator, step_fn, start_step: int, state,
                counters: dict[str, int], resumed: bool):
  """Steps to the end, to `config.max_steps_per_run` or to a signal; (step, state, last_val)."""
  config, mesh, total_steps = run.config, run.mesh, run.total_steps
  step = start_step
  pending = None  # metrics of the previous step, read one step late
  lr_fn = functools.partial(optim.learning_rates, config.optim, total_steps, run.warmup_steps)
  report = Reporter(evals.writer, Timer(step), total_steps, config, lr_fn, counters)
  last_val: dict[str, float] = {}
  stop_at = total_steps
  if config.max_steps_per_run > 0:
    stop_at = min(total_steps, start_step + config.max_steps_per_run)
  batch_log = (open_jsonl(run.workdir / "batches.jsonl")
               if config.log_batch_ids and run.is_main else None)
  try:
    with mesh:
      if resumed and evals.due(start_step):
        # The step was saved before its evaluation ran: a run killed in between would
        # otherwise never evaluate it (nor offer it as the best). Deterministic, so repeating a
        # finished one is harmless.
        last_val = evals.evaluate_and_offer_best(start_step, state)
      while step < stop_at:
        if preemption.requested():  # SIGTERM/SIGINT: stop at this step boundary
          break
        local = next(train_iter)
        if config.log_batch_ids:  # the global batch's clip ids, processes in order
          clip_ids = sharding.to_host(
              sharding.global_batch({"c": local["clip_id"]}, mesh))["c"]
        if batch_log:
          batch_log.write(json.dumps({"step": step + 1, "clip_id": clip_ids.tolist()}) + "\n")
          batch_log.flush()
        batch = sharding.global_batch(local, mesh)
        state, step_metrics = step_fn(state, batch)
        step += 1
        if pending is not None:
          report(pending)
        pending = (step, step_metrics)
        save_due = step % config.checkpoint_every_steps == 0 or step in (total_steps, stop_at)
        if save_due or evals.due(step):
          # Nothing of a step is saved or evaluated before its NaN check.
          report(pending, force=True)
          pending = None
        if save_due:
          ckpt.save(step, state, train_iter.checkpointable, run.resolved, counters=counters)
        if evals.due(step):
          last_val = evals.evaluate_and_offer_best(step, state)
    if pending is not None:
      report(pending, force=True)
    if start_step < step < stop_at and ckpt.latest_step() != step:  # stopped by a signal
      ckpt.save(step, state, train_iter.checkpointable, run.resolved, counters=counters,
                force=True)
    ckpt.wait()
  except BaseException:
    # Saves already started hold earlier steps, checked before they were saved: finish them.
    _finish_saves(ckpt)
    raise
  finally:
    report.close()
    train_iter.close()
    if batch_log:
      batch_log.close()
  return step, state, last_val


def _finish(run: _Run, ckpt: checkpoints.Checkpoints, evals: _Evals, step: int, state,
            last_val: dict[str, float]) -> dict[str, float]:
  """The test evaluation once training is complete; closes the run's files either way."""
  final = dict(last_val)
  if step < run.total_steps:  # stopped by a signal or max_steps_per_run: the next run resumes
    ckpt.close()
    if evals.writer:
      evals.writer.close()
    preemption.exit_if_requested(step)
    log.info("stopping at step %d of %d (max_steps_per_run); rerun to continue", step,
             run.total_steps)
    _log_results(run.workdir)
    return final

  final |= evals.test(step, state)
  ckpt.close()
  if evals.writer:
    evals.writer.close()
  _log_results(run.workdir)
  return final


def _log_results(workdir: pathlib.Path) -> None:
  """The closing line: where this run's results are, and its best checkpoint's full path."""
  def newest(folder: str) -> str:
    steps = [int(p.name) for p in (workdir / folder).glob("*") if p.name.isdigit()]
    return f"{folder}/{max(steps)}" if steps else ""

  names = ("metrics.jsonl", test_results.METRICS_FILE, test_results.RANKS_FILE, "tensorboard")
  found = ([name for name in names if (workdir / name).exists()]
           + [x for x in (newest("checkpoints"), newest("best")) if x])
  best = newest("best")
  best_text = (f"best checkpoint {workdir / best}" if best
               else "no best checkpoint (no validation ran)")
  log.info("results in %s: %s; %s", workdir, ", ".join(found) or "nothing written", best_text)


def _check_config_change(ckpt: checkpoints.Checkpoints, config_dict: dict,
                         config: ml_collections.ConfigDict) -> None:
  """A changed config is named before restoring (it would otherwise read as damage)."""
  step = ckpt.latest_step()
  if step is None:
    return
  step_dir = pathlib.Path(ckpt.last.directory) / str(step)
  try:
    saved = checkpoints.saved_config(step_dir)
  except Exception:  # noqa: BLE001 - a damaged step: restore_latest reports and skips it
    return
  config_change.check_resume(saved, config_dict,
                             step_dir=str(step_dir),
                             allow=bool(config.get("allow_config_change", False)))


def _eval_model(graphdef, state: train_state.TrainState, mesh) -> hade.HadeModel:
  """The model for evaluation, its weights replicated on every device.

  Evaluation feeds the same host data to every process; with replicated weights every result
  is replicated too, so each process can read it (params sharded over several processes are
  not readable from one of them).
  """
  params, rest = sharding.replicate((state.params, state.rest), mesh)
  return nnx.merge(graphdef, params, rest)


def _finish_saves(ckpt: checkpoints.Checkpoints) -> None:
  try:
    ckpt.wait()
    ckpt.close()
  except Exception:  # noqa: BLE001 - the error being raised matters more
    log.exception("could not finish the checkpoints in flight")


def _check_same_global_batch(ckpt: checkpoints.Checkpoints, step: int, saved: int | None,
                             batch_size: int):
  """The data position carries over (to any number of processes) only with the same batch."""
  step_dir = pathlib.Path(ckpt.last.directory) / str(step)
  if saved is not None and saved != batch_size:
    raise ValueError(
        f"the checkpoint {step_dir} was trained with global batch_size={saved} but this run "
        f"asks for {batch_size}: its position in the data does not carry over. Keep "
        f"--config.batch_size={saved} to resume (on any number of hosts), or start a new "
        f"workdir with --config.init.resume={step_dir} (weights and optimizer state; the "
        "data order starts afresh).")


class Reporter:
  """Host side of a step, one step late: NaN check, skip count, console line or progress bar,
  metric files.

  On a terminal (`use_progress_bar`) process 0 shows a tqdm bar with a smoothed ETA instead of
  the per-step log lines (other log lines print above the bar); otherwise the log lines.
  """

  def __init__(self, writer: MetricWriter | None, timer: Timer, total_steps: int,
               config: ml_collections.ConfigDict, lr_fn, counters: dict[str, int],
               progress_bar: bool | None = None):
    self.writer, self.timer, self.total_steps = writer, timer, total_steps
    self.config, self.lr_fn = config, lr_fn
    self.counters = counters  # updated in place; saved with every checkpoint
    if progress_bar is None:
      progress_bar = writer is not None and use_progress_bar()
    self.progress_bar = progress_bar
    self.bar = self._redirect = None  # created at the first step reported: after the compile

  def __call__(self, pending, force: bool = False):
    step, m = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    self._check_finite(step, m)
    config = self.config
    if self.progress_bar:
      self._advance_bar(step)
    if not (force or step % config.log_every_steps == 0):
      return
    rate = self.timer.rate(step)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    m |= {"steps_per_s": rate, "clips_per_s": rate * config.batch_size}
    m |= self.lr_fn(step)
    if config.skip_nonfinite_steps:
      m["skipped_steps"] = self.counters["skipped_steps"]
    if self.writer:
      terms = " ".join(f"{k}={v:.4f}" for k, v in sorted(m.items()) if k.startswith("loss"))
      if self.bar is not None:
        self.bar.set_postfix_str(terms, refresh=False)
      else:
        log.info("step %d/%d %s | %.2f steps/s %.1f clips/s | ETA %s", step, self.total_steps,
                 terms, rate, rate * config.batch_size, _fmt_time(eta))
      self.writer.write(step, {f"train/{k}": v for k, v in m.items()})

  def _advance_bar(self, step: int) -> None:
    if self.bar is None:
      import tqdm
      from tqdm.contrib import logging as tqdm_logging

      # The ETA is the steps left over an exponential average of the rate (smoothing=0.05:
      # about the last 20 updates), so an evaluation or a slow batch moves it little.
      self.bar = tqdm.tqdm(total=self.total_steps, initial=step - 1, unit="step",
                           smoothing=0.05, dynamic_ncols=True, file=sys.stderr)
      # Log lines (evaluations, checkpoints) print above the bar instead of through it.
      self._redirect = tqdm_logging.logging_redirect_tqdm()
      self._redirect.__enter__()
    self.bar.update(step - self.bar.n)

  def close(self) -> None:
    """Ends the progress bar, if any (the log lines go to stderr directly again)."""
    if self.bar is not None:
      self.bar.close()
      self._redirect.__exit__(None, None, None)
      self.bar = self._redirect = None

  def _check_finite(self, step: int, m: dict[str, float]) -> None:
    if m.pop("finite"):
      self.counters["consecutive_skips"] = 0
      return
    what = (f"non-finite loss/gradient between steps {step - 1} and {step}: "
            f"loss={m['loss']}, grad_norm={m['grad_norm']}")
    if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]):
      what = (f"non-finite parameters or batch-norm statistics after the "
              f"update between steps {step - 1} and {step} (loss={m['loss']}, "
              f"grad_norm={m['grad_norm']})")
    cap = self.config.max_consecutive_skips
    if not self.config.skip_nonfinite_steps:
      raise NonFiniteError(
          f"{what}. Nothing from step {step} on was saved: the last checkpoint holds an "
          "earlier, finite state. --config.skip_nonfinite_steps=True skips such steps.")
    self.counters["skipped_steps"] += 1
    self.counters["consecutive_skips"] += 1
    n = self.counters["consecutive_skips"]
    if cap and n >= cap:
      raise NonFiniteError(f"{what}; {n} steps in a row (steps {step - n + 1}..{step}) were "
                           f"non-finite (config.max_consecutive_skips={cap}): stopping. The "
                           "last checkpoint holds the state before them.")
    log.warning("skipped step %d (%d skipped in all, %d in a row): %s", step,
                self.counters["skipped_steps"], n, what)


def use_progress_bar(stream=None) -> bool:
  """A tqdm progress bar when `stream` (default stderr, where the logs go) is a terminal;
  plain log lines otherwise (files, pipes, batch jobs)."""
  stream = sys.stderr if stream is None else stream
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


def _log_first_call(step_fn):
  """`step_fn` that logs around its first call, where jit traces and compiles it (later calls
  only dispatch), so the minutes of compilation are announced and then timed."""
  first = True

  def call(*args):
    nonlocal first
    if not first:
      return step_fn(*args)
    first = False
    log.info("compiling the training step...")
    start = time.perf_counter()
    out = step_fn(*args)
    log.info("compiled in %.1f s", time.perf_counter() - start)
    return out

  return call


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Timer:
  """Steps per second over the recent window (excludes compilation after the first report)."""

  def __init__(self, step: int):
    self.step, self.time = step, time.perf_counter()

  def rate(self, step: int) -> float:
    now = time.perf_counter()
    r = (step - self.step) / max(now - self.time, 1e-9)
    self.step, self.time = step, now
    return r


def open_jsonl(path: pathlib.Path):
  """Opens a JSON-lines file for appending; drops a last line a killed run left unfinished."""
  if path.exists():
    with open(path, "rb+") as f:
      size = f.seek(0, 2)
      tail_start = max(0, size - (1 << 20))
      f.seek(tail_start)
      tail = f.read()
      if tail and not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n")
        if cut >= 0 or tail_start == 0:
          f.truncate(tail_start + cut + 1)
  return open(path, "a", encoding="utf-8")  # noqa: SIM115


# Characters TensorBoard summary names may hold (tensorboardX `summary._clean_tag`, after
# TensorFlow's op names: it replaces any other with '_' and warns "Summary name ... is illegal").
_TAG_ILLEGAL = re.compile(r"[^-/\w\.]")
# The metric names' characters outside that set and the text that stands for each in the tags.
TAG_REPLACEMENTS = {"@": "_at_", "+": "_plus_"}


def tensorboard_tag(name: str) -> str:
  """The TensorBoard tag of a metrics.jsonl name: '@' -> '_at_', '+' -> '_plus_'.

  E.g. 'val/t2a/R@1+R@5+R@10' -> 'val/t2a/R_at_1_plus_R_at_5_plus_R_at_10'. One to one: a name
  holding a replacement text already, or another illegal character, is refused (such a name
  would need its own replacement here, the one place of the mapping).

  Raises:
    ValueError: naming the metric and the character or text.
  """
  for text in TAG_REPLACEMENTS.values():
    if text in name:
      raise ValueError(f"metric name {name!r} holds {text!r}, the TensorBoard tag text of "
                       "another character (trainer.TAG_REPLACEMENTS): rename the metric")
  tag = name
  for char, text in TAG_REPLACEMENTS.items():
    tag = tag.replace(char, text)
  bad = _TAG_ILLEGAL.search(tag)
  if bad or tag.startswith("/"):
    raise ValueError(f"metric name {name!r}: {bad[0] if bad else '/'!r} cannot start or be in "
                     "a TensorBoard tag; add its replacement to trainer.TAG_REPLACEMENTS")
  return tag


class MetricWriter:
  """metrics.jsonl + TensorBoard event files (process 0 only).

  TensorBoard's tags are the metrics.jsonl names with '@' and '+' spelled out
  (`tensorboard_tag`): R@1 is R_at_1 there.

  A run resuming at `start_step` supersedes what a killed run logged after that step: those
  lines are dropped from metrics.jsonl (rewritten atomically), the new TensorBoard event file
  asks TensorBoard to discard the old files' events from `start_step + 1` on (`purge_step`),
  and lines the resumed run repeats at `start_step` itself (the evaluation of the restored
  step) are not written twice. Each metric's steps stay strictly increasing.
  """

  def __init__(self, workdir: pathlib.Path, start_step: int = 0):
    path = workdir / "metrics.jsonl"
    self.start_step = start_step
    self.logged_at_start = _drop_lines_after(path, start_step)
    self.jsonl = open_jsonl(path)
    try:
      from tensorboardX import SummaryWriter

      self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
    except ImportError:  # tensorboardX is an install requirement; tolerate its absence anyway
      self.tb = None

  def write(self, step: int, values: dict[str, float]):
    if step == self.start_step and values.keys() <= self.logged_at_start:
      return  # a repeat of what the interrupted run logged for this step
    self.jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}})
                     + "\n")
    self.jsonl.flush()
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(tensorboard_tag(k), float(v), int(step))
      self.tb.flush()

  def close(self):
    self.jsonl.close()
    if self.tb:
      self.tb.close()


def _drop_lines_after(path: pathlib.Path, step: int) -> set[str]:
  """Removes the lines of `path` past `step` (atomically); returns the keys logged at `step`."""
  if not path.exists():
    return set()
  keep, at_step, dropped = [], set(), 0
  for line in path.read_bytes().splitlines(keepends=True):
    try:
      entry = json.loads(line)
      line_step = int(entry["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1  # a line torn by a kill
      continue
    if line_step > step:
      dropped += 1
      continue
    if line_step == step:
      at_step |= entry.keys() - {"step"}
    keep.append(line if line.endswith(b"\n") else line + b"\n")
  if dropped:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(keep))
    os.replace(tmp, path)
    log.info("dropped %d lines past step %d from %s (the interrupted run's steps after its "
             "last checkpoint)", dropped, step, path)
  return at_step
