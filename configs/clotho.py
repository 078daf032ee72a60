"""HADE on Clotho v2.1 at paper scale (docs/method.md section 7).

Prepare Clotho first (audio + CSVs from Zenodo in one folder):
  python -m data_pipelines.prepare --dataset=clotho --config=48k \
      --manual_dir=/path/to/clotho --data_dir=~/tensorflow_datasets
Then, with local copies of the pretrained towers (nothing is fetched from a hub):
  python -m hade_jax.train --config=configs/clotho.py --workdir=/tmp/hade_clotho \
      --config.init.clap=/path/to/clap-htsat-unfused            # LAION-CLAP: both towers
  or --config.init.text_tower=/path/to/bert-base-uncased --config.data.tokenizer_dir=same
Ablations: --config=configs/clotho.py:ablation=global|tha|dcr|full
"""

from __future__ import annotations

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config()
  args = base.parse_arg(arg)
  c.data.dataset = "clotho"
  c.data.builder_config = "48k"  # LAION-CLAP front end: 48 kHz, hop 480, 64 mels
  c.data.crop_seconds = 10.0
  c.data.max_text_len = 32
  c.batch_size = 128
  c.num_epochs = 40.0
  c.optim.warmup_epochs = 1.0
  c.optim.lr.backbone = 5e-5
  c.optim.lr.heads = 1e-4
  c.eval_every_steps = 500  # ~2 epochs of Clotho development (3,839 clips / 128)
  c.checkpoint_every_steps = 500
  base.apply_ablation(c, args.get("ablation", "full"))
  return c
