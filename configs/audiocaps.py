"""HADE on AudioCaps at paper scale (docs/method.md section 7).

Prepare AudioCaps first (the CSVs + your local audio; missing clips are skipped and listed):
  python -m data_pipelines.prepare --dataset=audiocaps --config=48k \
      --manual_dir=/path/to/audiocaps --data_dir=~/tensorflow_datasets
Then:
  python -m hade_jax.train --config=configs/audiocaps.py --workdir=/tmp/hade_audiocaps \
      --config.init.clap=/path/to/clap-htsat-unfused
Ablations: --config=configs/audiocaps.py:ablation=global|tha|dcr|full
"""

from __future__ import annotations

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config()
  args = base.parse_arg(arg)
  c.data.dataset = "audiocaps"
  c.data.builder_config = "48k"
  c.data.crop_seconds = 10.0
  c.data.max_text_len = 30
  c.batch_size = 128
  c.num_epochs = 20.0
  c.optim.warmup_epochs = 1.0
  c.eval_every_steps = 2000  # ~5 epochs of AudioCaps train (49,838 clips / 128)
  c.checkpoint_every_steps = 1000
  base.apply_ablation(c, args.get("ablation", "full"))
  return c
