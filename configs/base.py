"""The full config schema of hade_jax: every key, its default, and what it means.

Experiment configs (clotho.py, audiocaps.py, demo.py) start from `get_config()` and override.
The model sub-configs mirror the frozen dataclasses the modules take (`htsat.HtsatConfig`,
`bert.BertConfig`, `heads.HeadsConfig`, `frontend.LogMelConfig`, `losses.LossConfig`); their
field comments live there. Configs are locked by the flag parser: a typo fails at once.

Ablations from the command line, e.g. `--config=configs/clotho.py:ablation=tha`:
  global  global cosine only           tha   global + THA
  dcr     global + DCR (with CA)       full  global + THA + DCR (default)
The paper's score S = S_THA + gamma S_DCR is `--config.model.heads.use_global=False`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from hade_jax import bert, frontend, heads, htsat, losses

ABLATIONS = {
    "global": dict(use_tha=False, use_dcr=False),
    "tha": dict(use_tha=True, use_dcr=False),
    "dcr": dict(use_tha=False, use_dcr=True),
    "full": dict(use_tha=True, use_dcr=True),
}


def as_config(dc) -> ml_collections.ConfigDict:
  """A frozen dataclass as a ConfigDict (tuples stay tuples, dtypes become their names)."""
  d = dataclasses.asdict(dc)
  if "dtype" in d:
    d["dtype"] = jnp.dtype(d["dtype"]).name
  return ml_collections.ConfigDict(d)


def model_config(audio: htsat.HtsatConfig, text: bert.BertConfig, mel: frontend.LogMelConfig,
                 head: heads.HeadsConfig) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "audio": as_config(audio), "text": as_config(text), "mel": as_config(mel),
      "heads": as_config(head)})


def parse_arg(arg: str | None) -> dict[str, str]:
  """'ablation=tha,foo=bar' -> {'ablation': 'tha', 'foo': 'bar'}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip()
  return out


def apply_ablation(config: ml_collections.ConfigDict, name: str) -> None:
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
  for key, value in ABLATIONS[name].items():
    config.model.heads[key] = value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Everything random derives from it: init, shuffle, crops, dropout, SpecAugment.

  # -- Data -----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "clotho"  # 'clotho', 'audiocaps' or 'synthcaps' (TFDS builder name).
  c.data.data_dir = "~/tensorflow_datasets"  # where prepared TFDS datasets live.
  c.data.manual_dir = ""  # the raw download (only used by the prepare hint / demo auto-prepare).
  c.data.builder_config = "48k"  # TFDS builder config = stored sample rate; must match model.mel.
  c.data.train_split = "train"
  c.data.eval_split = "validation"  # used for periodic validation and best-model selection.
  c.data.test_split = "test"  # used by the final evaluation.
  c.data.crop_seconds = 10.0  # training: random crops (pad shorter clips); eval: see pipeline.
  c.data.max_text_len = 32  # tokens per caption incl. special tokens.
  c.data.tokenizer_dir = ""  # folder with tokenizer.json (or vocab.txt) of the text tower.
  c.data.num_workers = 2  # Grain worker processes (0 = in the main process).
  c.data.spec_augment = True  # SpecAugment on the log-mel (stripes sampled on host).
  c.data.spec_time_stripes = 2
  c.data.spec_time_width = 64  # max frames per time stripe.
  c.data.spec_freq_stripes = 2
  c.data.spec_freq_width = 8  # max mel bins per frequency stripe.
  c.data.pad_mode = "zeros"  # clips shorter than the crop: 'zeros' (pad at end) or 'repeat'.
  c.data.eval_crop = "head"  # eval: 'head' (first crop_seconds) or 'center' of longer clips.
  c.data.num_threads = 2  # threads per process (or worker) assembling batches.
  c.data.prepare_if_missing = False  # demo: generate + prepare synthcaps when absent.
  c.data.synth_size = ""  # synthcaps size ('tiny', 'demo', 'full'): builder '<size>_<rate>'.

  # -- Model ----------------------------------------------------------------------------------
  c.model = model_config(htsat.HtsatConfig.tiny(), bert.BertConfig.bert_base(),
                         frontend.LogMelConfig.laion_clap(), heads.HeadsConfig())
  c.loss = as_config(losses.LossConfig())

  # -- Initialisation (resume order: workdir checkpoint > init.resume > imports > scratch) ----
  c.init = ml_collections.ConfigDict()
  c.init.resume = ""  # a checkpoint directory to start from (state only, new data order).
  c.init.text_tower = ""  # local HF folder (BERT/RoBERTa) imported into the text tower.
  c.init.audio_tower = ""  # local HF ClapAudioModel folder imported into the audio tower.
  c.init.clap = ""  # local HF ClapModel folder: both towers + their projections.

  # -- Optimisation ---------------------------------------------------------------------------
  c.batch_size = 128  # global batch (all processes); must divide over the 'data' x 'fsdp' axes.
  c.num_epochs = 30.0  # training length in epochs of the train split...
  c.total_steps = -1  # ...or in steps when > 0 (overrides num_epochs).
  c.optim = ml_collections.ConfigDict()
  # Ordered (regex over parameter paths, group); first match wins.
  c.optim.groups = (("^(audio_encoder|text_encoder)/", "backbone"), (".*", "heads"))
  c.optim.lr = ml_collections.ConfigDict({"backbone": 5e-5, "heads": 1e-4})  # peak per group.
  c.optim.weight_decay = ml_collections.ConfigDict({"backbone": 0.01, "heads": 0.2})
  c.optim.frozen = ()  # groups that get no update, e.g. ('backbone',).
  c.optim.warmup_epochs = 1.0  # linear warmup, then cosine decay to end_factor * peak.
  c.optim.end_factor = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8  # Adam's epsilon.
  c.optim.clip_norm = 2.0  # global gradient-norm clip (0 = off).
  c.optim.accum_steps = 1  # gradient accumulation (optax.MultiSteps); negatives stay per step.
  # A step whose loss, gradient or updated state is NaN/Inf: False = stop with NonFiniteError
  # (the checkpoints hold earlier steps); True = skip it (keep parameters, optimizer state and
  # batch-norm statistics; the data moves on), counted in train/skipped_steps (checkpointed).
  c.skip_nonfinite_steps = False
  c.max_consecutive_skips = 10  # ...and stop after N skipped steps in a row (0 = never).
  c.compute_dtype = "float32"  # 'bfloat16' runs both towers in bf16 (params stay float32).

  # -- Devices --------------------------------------------------------------------------------
  c.mesh = (("data", -1), ("fsdp", 1))  # -1 = all remaining devices.
  c.sharding_rules = ((".*", "fsdp"),)  # (regex, spec): 'fsdp', 'replicate' or axis tuple.

  # -- Checkpoints, logging and evaluation ----------------------------------------------------
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # the last N steps; the best step is kept apart in workdir/best.
  c.best_metric = "val/t2a/R@1+R@5+R@10"  # model selection (HADE.md section 7).
  c.log_every_steps = 50  # console + metrics.jsonl + TensorBoard.
  c.eval_every_steps = 1000  # validation retrieval metrics (0 = only at the end).
  c.eval_batch_size = 64  # clips / captions per encoder call at evaluation.
  c.eval_tile = 256  # (clips x captions) tile edge for the pairwise score.
  c.eval_max_clips = 0  # validate on the first N clips only (0 = all).
  c.final_eval_split = "test"  # evaluated with the best checkpoint at the end ('' = none).
  c.max_steps_per_run = 0  # stop cleanly (with a checkpoint) after N steps of this run.
  c.log_batch_ids = False  # write each step's clip ids to batches.jsonl (data-order checks).
  # Resuming a workdir whose checkpoint was saved with another seed, optimizer, loss or training
  # data: refused unless True (then logged); model changes are always refused
  # (hade_jax/config_change.py).
  c.allow_config_change = False

  args = parse_arg(arg)
  apply_ablation(c, args.get("ablation", "full"))
  return c
