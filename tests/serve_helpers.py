"""What the serve tests share: a small real folder (ESC-50 clips, one per category) indexed with
the tiny random HADE (search needs a model, not a good one: expected results are computed
from the same model)."""

import csv
import pathlib
import shutil

from hade_jax import api, search
from tests.tiny_train_config import save_random_checkpoint


def esc50_subset(shared_data: pathlib.Path, dest: pathlib.Path, count: int) -> pathlib.Path:
  """The first clip of each of `count` ESC-50 categories, copied into `dest` (an index serves
  only files inside its own folder, so a symlink to ../shared would be refused)."""
  folder = shared_data / "esc50_dev"
  picked = {}
  with open(folder / "esc50_dev.csv", newline="") as f:
    for row in csv.DictReader(f):
      if row["category"] not in picked and len(picked) < count:
        picked[row["category"]] = row["file_name"]
  dest.mkdir(parents=True)
  for category, name in picked.items():
    shutil.copy(folder / "audio" / name, dest / f"{category}_{name}")
  return dest


def indexed_folder(tmp: pathlib.Path, shared_data: pathlib.Path, minilm_dir: pathlib.Path,
                   count: int = 20) -> tuple[api.Hade, search.Index]:
  """(model, index) of `count` real clips, the model saved as a checkpoint the index names."""
  workdir = save_random_checkpoint(tmp / "wd", minilm_dir)
  model = api.Hade.load(workdir)
  audio = esc50_subset(shared_data, tmp / "sounds", count)
  return model, search.build_index(model, audio, tmp / "index", progress=False)
