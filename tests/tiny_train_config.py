"""A tiny HADE training config for tests (also run by subprocesses via --config).

  --config=tests/tiny_train_config.py --config.data.data_dir=... --config.data.tokenizer_dir=...
"""

import pathlib

from configs import base, demo
from hade_jax import bert, frontend, heads, htsat


def tiny_config(data_dir: pathlib.Path | str = "", minilm_dir: pathlib.Path | str = "",
                **overrides):
  c = demo.get_config()
  c.data.synth_size = "tiny"
  c.data.data_dir = str(data_dir)
  c.data.crop_seconds = 1.27  # 1 + 20320 / 160 = 128 frames = the grid
  c.data.max_text_len = 16
  c.data.tokenizer_dir = str(minilm_dir)
  c.data.spec_time_width = 8
  c.data.spec_freq_width = 2
  mel = frontend.LogMelConfig(sample_rate=16_000, n_fft=256, hop_length=160, n_mels=32,
                              f_min=50.0, f_max=8000.0)
  audio = htsat.HtsatConfig.tiny(spec_size=64, num_mel_bins=32, patch_embeds_hidden_size=8,
                                 depths=(1, 1, 1, 1), num_attention_heads=(1, 2, 2, 2),
                                 window_size=2, hidden_dropout_prob=0.1)
  text = bert.BertConfig.small_test(vocab_size=30522, num_hidden_layers=2, hidden_size=16,
                                    num_attention_heads=2, intermediate_size=32)
  head = heads.HeadsConfig(embed_dim=16, num_factors=4, levels=((2, 1), (4, 2)),
                           text_pool="mean", projection="linear")
  c.model = base.model_config(audio, text, mel, head)
  c.init.text_tower = ""
  c.optim.groups = ((".*", "all"),)
  c.optim.lr = base.ml_collections.ConfigDict({"all": 1e-3})
  c.optim.weight_decay = base.ml_collections.ConfigDict({"all": 0.01})
  c.optim.frozen = ()
  c.batch_size = 8
  c.total_steps = 4
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 0
  c.log_every_steps = 1
  c.eval_batch_size = 8
  c.eval_tile = 8
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for p in path:
      target = target[p]
    target[leaf] = value
  return c



def get_config(arg=None):
  """`--config=tests/tiny_train_config.py[:ablation=NAME,frozen=text]`: an ablation variant
  (configs/base.py ABLATIONS), and with `frozen=text` the text tower a frozen group (stored
  once per workdir, as the demo's is)."""
  args = base.parse_arg(arg)
  if sorted(set(args) - {"ablation", "frozen"}) or args.get("frozen", "text") != "text":
    raise ValueError(f"unknown tiny config argument {arg!r}; use ablation=NAME and/or frozen=text")
  overrides = {}
  if args.get("frozen") == "text":
    overrides = {"optim.groups": (("^text_encoder/", "text"), (".*", "rest")),
                 "optim.lr": base.ml_collections.ConfigDict({"text": 0.0, "rest": 1e-3}),
                 "optim.weight_decay": base.ml_collections.ConfigDict({"text": 0.0,
                                                                       "rest": 0.01}),
                 "optim.frozen": ("text",)}
  c = tiny_config(final_eval_split="test", **overrides)
  base.apply_ablation(c, args.get("ablation", "full"))
  return c


def save_random_checkpoint(workdir: pathlib.Path, minilm_dir: pathlib.Path | str, seed: int = 3
                           ) -> pathlib.Path:
  """A checkpoint of a randomly initialised tiny HADE in `workdir`, as the trainer lays it out
  (step 0). Search and evaluation need a model, not a good one."""
  from flax import nnx

  from hade_jax import checkpoints, hade, optim, train_state

  config = tiny_config("", minilm_dir)
  model = hade.HadeModel(hade.model_config(config), rngs=nnx.Rngs(seed))
  tx = optim.make(hade.split_model(model)[1], config.optim, total_steps=config.total_steps,
                  warmup_steps=0)
  state = train_state.TrainState.create(model, tx)
  ckpt = checkpoints.Checkpoints(workdir, keep=1, best_metric=None)
  ckpt.save(0, state, None, config.to_dict())
  ckpt.wait()
  ckpt.close()
  return workdir
