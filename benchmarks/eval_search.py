"""Evaluation and search benchmarks (BENCHMARKS.md, section "Evaluation and search").

  python -m benchmarks.eval_search            # Clotho-size scoring; corpora of 1e3..1e6 clips
  python -m benchmarks.eval_search --quick    # a few minutes: smaller sizes

1. Full scoring (`retrieval.Encoder.score`, the evaluator's all-pairs HADE score) of Clotho
   evaluation size, 1,045 clips x 5,225 captions, for several tile edges (`config.eval_tile`):
   wall time (the first tile, which compiles, is timed apart) and peak memory.
2. Query latency against corpus size, 10^3 to 10^6 clips: exhaustive search (full score of
   every clip) vs two-stage search (global-cosine shortlist, full score on the shortlist), and
   the recall two-stage loses: the share of the exhaustive top 10 it returns, and R@1/R@10 of
   the clip each query was made from.

Features are synthetic, with the shapes of `configs/demo.py`'s model (joint width 256; THA
levels of 64, 32 and 16 audio frames against 32 word tokens; 8 DCR factors) and scored by that
model's heads (random initialisation: only their cost and the score's structure matter here).
Captions have 8-20 valid tokens of 32. For search, clips fall in 2,048 clusters: a clip's
global embedding is its cluster's centre plus noise (distinct for every clip), its per-level
tokens are its cluster's (so a 10^6-clip corpus needs no 115 GB of tokens), its DCR factors
come from its global embedding as in the model; a query is made from one clip (its global
embedding plus noise, tokens drawn from the clip's tokens plus noise).

Each measurement runs in a subprocess of its own, so its peak resident set size
(`getrusage(RUSAGE_SELF).ru_maxrss`) belongs to it alone; the RSS before the measured part is
reported too. Results are printed as markdown and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

LEVEL_FRAMES = (64, 32, 16)  # configs/demo.py: HTS-AT stages 2/3/4 of a 10 s clip
WORDS = 32  # configs/demo.py: max_text_len
POOL = 2048  # clusters of the synthetic search corpus


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _demo_model():
  from flax import nnx

  from configs import demo
  from hade_jax import hade

  return hade.HadeModel(hade.model_config(demo.get_config()), rngs=nnx.Rngs(0))


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _text_features(rng: np.random.Generator, g_TxD: np.ndarray, tokens: list[np.ndarray],
                   k: int):
  """Caption features around `g_TxD`; `tokens[l]` [T, M, D] (normalised here)."""
  from hade_jax import heads as hade_heads

  t = len(g_TxD)
  lengths = rng.integers(8, 21, size=t)
  mask_TxM = np.arange(WORDS)[None] < lengths[:, None]
  levels = tuple(_unit(x) for x in tokens)
  logits = tuple(rng.standard_normal((t, WORDS)).astype(np.float32) for _ in tokens)
  return hade_heads.TextFeatures(g_TxD.astype(np.float32), levels, (mask_TxM,) * len(tokens),
                                 logits, g_TxD.reshape(t, k, -1).astype(np.float32))


def _random_split(rng: np.random.Generator, num_a: int, num_t: int, d: int = 256, k: int = 8):
  from hade_jax import heads as hade_heads

  audio = hade_heads.AudioFeatures(
      rng.standard_normal((num_a, d)).astype(np.float32),
      tuple(_unit(rng.standard_normal((num_a, n, d), np.float32)) for n in LEVEL_FRAMES),
      tuple(np.ones((num_a, n), bool) for n in LEVEL_FRAMES),
      tuple(rng.standard_normal((num_a, n)).astype(np.float32) for n in LEVEL_FRAMES),
      rng.standard_normal((num_a, k, d // k)).astype(np.float32))
  g = rng.standard_normal((num_t, d)).astype(np.float32)
  tokens = [rng.standard_normal((num_t, WORDS, d), np.float32) for _ in LEVEL_FRAMES]
  return audio, _text_features(rng, g, tokens, k)


# ---------------------------------------------------------------------------------------------
# 1. Full scoring.


def child_score(clips: int, captions: int, tile: int) -> dict:
  from hade_jax import retrieval

  rng = np.random.default_rng(0)
  audio, text = _random_split(rng, clips, captions)
  enc = retrieval.Encoder(_demo_model())
  rss_before = _rss_mb()
  t0 = time.perf_counter()
  first = enc.score(jax_slice(audio, tile), jax_slice(text, tile), tile=tile)  # compiles
  t1 = time.perf_counter()
  scores = enc.score(audio, text, tile=tile)
  t2 = time.perf_counter()
  assert scores.shape == (clips, captions) and np.isfinite(scores).all() and first.size
  return {"clips": clips, "captions": captions, "tile": tile, "compile_s": t1 - t0,
          "score_s": t2 - t1, "pairs_per_s": clips * captions / (t2 - t1),
          "rss_before_mb": rss_before, "peak_rss_mb": _peak_rss_mb()}


def jax_slice(features, n: int):
  import jax

  return jax.tree.map(lambda x: x[:n], features)


# ---------------------------------------------------------------------------------------------
# 2. Search.


class SyntheticIndex:
  """A corpus of N clips in POOL clusters (see the module docstring); a `retrieval.ClipIndex`."""

  def __init__(self, n: int, seed: int = 0, d: int = 256, k: int = 8):
    rng = np.random.default_rng(seed)
    self.k = k
    self.cluster_N = rng.integers(POOL, size=n).astype(np.int32)
    centres = rng.standard_normal((POOL, d)).astype(np.float32)
    self._global = np.empty((n, d), np.float32)
    for start in range(0, n, 1 << 16):  # in blocks: no float64 temporaries of N x D
      stop = min(start + (1 << 16), n)
      noise = rng.standard_normal((stop - start, d), np.float32)
      self._global[start:stop] = centres[self.cluster_N[start:stop]] + 0.7 * noise
    self.pool_levels = [_unit(rng.standard_normal((POOL, f, d), np.float32))
                        for f in LEVEL_FRAMES]
    self.pool_logits = [rng.standard_normal((POOL, f)).astype(np.float32) for f in LEVEL_FRAMES]

  def __len__(self) -> int:
    return len(self._global)

  @property
  def global_NxD(self) -> np.ndarray:
    return self._global

  def take(self, rows):
    from hade_jax import heads as hade_heads

    rows = np.asarray(rows)
    c = self.cluster_N[rows]
    g = self._global[rows]
    return hade_heads.AudioFeatures(
        g, tuple(x[c] for x in self.pool_levels),
        tuple(np.ones((len(rows), f), bool) for f in LEVEL_FRAMES),
        tuple(x[c] for x in self.pool_logits), g.reshape(len(rows), self.k, -1))

  def queries(self, targets: np.ndarray, seed: int = 1):
    """Text features made from the target clips."""
    rng = np.random.default_rng(seed)
    g = self._global[targets] + 1.2 * rng.standard_normal((len(targets), self._global.shape[1]),
                                                          np.float32)
    tokens = []
    for pool in self.pool_levels:
      words = rng.integers(pool.shape[1], size=(len(targets), WORDS))
      base = pool[self.cluster_N[targets]][np.arange(len(targets))[:, None], words]
      tokens.append(base + 0.7 * rng.standard_normal(base.shape, np.float32) / np.sqrt(256))
    return _text_features(rng, g, tokens, self.k)


def child_search(n: int, num_recall_queries: int, shortlists: list[int], reps: int,
                 tile: int) -> dict:
  import jax

  from hade_jax import retrieval

  t0 = time.perf_counter()
  index = SyntheticIndex(n)
  build_s = time.perf_counter() - t0
  enc = retrieval.Encoder(_demo_model())
  rss_before = _rss_mb()
  searcher = retrieval.Searcher(enc, index)
  rng = np.random.default_rng(2)
  k = 10
  out = {"clips": n, "build_s": build_s, "rss_before_mb": rss_before, "two_stage": {}}
  one = lambda text, q: jax.tree.map(lambda x: x[q:q + 1], text)  # noqa: E731
  latency_queries = index.queries(rng.integers(n, size=reps + 1), seed=3)
  for s in shortlists:
    searcher.search(one(latency_queries, 0), k, s)  # compiles
    times = []
    for q in range(1, reps + 1):
      t = time.perf_counter()
      searcher.search(one(latency_queries, q), k, s)
      times.append(time.perf_counter() - t)
    out["two_stage"][s] = {"median_ms": 1e3 * float(np.median(times)),
                           "p90_ms": 1e3 * float(np.percentile(times, 90))}
  # Exhaustive: one batch of queries (the recall reference); its time per query is reported.
  targets = rng.choice(n, size=num_recall_queries, replace=False)
  text = index.queries(targets, seed=4)
  searcher.exhaustive(one(text, 0), k, tile=tile, chunk=min(n, 2 * tile))  # compiles
  t = time.perf_counter()
  exhaustive = searcher.exhaustive(text, k, tile=tile, chunk=min(n, 2 * tile))
  out["exhaustive_ms_per_query"] = 1e3 * (time.perf_counter() - t) / num_recall_queries
  out["recall_queries"] = num_recall_queries

  def target_recall(rows_QxK):
    hit = rows_QxK == targets[:, None]
    return {"R@1": 100 * float(hit[:, :1].any(1).mean()),
            "R@10": 100 * float(hit[:, :10].any(1).mean())}

  out["exhaustive_target"] = target_recall(exhaustive.rows_QxK)
  for s in shortlists:
    result = searcher.search(text, k, s)
    kept = [len(set(a) & set(b)) / k for a, b in zip(result.rows_QxK.tolist(),
                                                     exhaustive.rows_QxK.tolist(), strict=True)]
    out["two_stage"][s] |= {"top10_kept": 100 * float(np.mean(kept)),
                            "target": target_recall(result.rows_QxK)}
  out["peak_rss_mb"] = _peak_rss_mb()
  return out


def child_text(reps: int) -> dict:
  """Latency of embedding one query with the demo model's text tower (MiniLM-L6 size)."""
  from configs import demo
  from hade_jax import retrieval, tokenizer

  enc = retrieval.Encoder(_demo_model())
  tok = tokenizer.Tokenizer(demo.minilm_dir(), WORDS)
  ids, mask = tok(["a dog barks while cars pass"])
  enc.text(ids, mask, 1)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    enc.text(ids, mask, 1)
    times.append(time.perf_counter() - t)
  return {"median_ms": 1e3 * float(np.median(times))}


# ---------------------------------------------------------------------------------------------
# Driver.


def run_child(kind: str, **kwargs) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.eval_search", "--child", json.dumps([kind, kwargs])]
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{kind} {kwargs} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> str:
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  import jax

  return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
          f"{mem:.0f} GiB memory, JAX {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s))")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes)")
  parser.add_argument("--out", default="", help="JSON results file")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    kind, kwargs = json.loads(args.child)
    fn = {"score": child_score, "search": child_search, "text": child_text}[kind]
    print(json.dumps(fn(**kwargs)))
    return

  results = {"machine": machine(), "load_before": os.getloadavg()[0], "quick": args.quick}
  print(f"machine: {results['machine']}; 1-min load average {results['load_before']:.1f}")
  if args.quick:
    clips, captions, tiles = 209, 1045, (64, 256)
    sizes = [(1_000, 16), (10_000, 8)]
  else:
    clips, captions, tiles = 1045, 5225, (128, 256, 512)
    sizes = [(1_000, 16), (10_000, 16), (100_000, 8), (1_000_000, 2)]

  print(f"\n### Full scoring, {clips:,} clips x {captions:,} captions\n")
  print("| tile | compile + first tile (s) | scoring (s) | pairs/s | RSS before (MB) | "
        "peak RSS (MB) |")
  print("|---|---|---|---|---|---|")
  results["score"] = []
  for tile in tiles:
    r = run_child("score", clips=clips, captions=captions, tile=tile)
    results["score"].append(r)
    print(f"| {tile} | {r['compile_s']:.1f} | {r['score_s']:.1f} | {r['pairs_per_s']:,.0f} | "
          f"{r['rss_before_mb']:,.0f} | {r['peak_rss_mb']:,.0f} |", flush=True)

  shortlists = [100, 1000]
  results["text"] = run_child("text", reps=20)
  print(f"\ntext embedding of one query (demo text tower): "
        f"{results['text']['median_ms']:.1f} ms (median)")
  print("\n### Query latency and recall against corpus size\n")
  print("| clips | two-stage S=100 (ms) | two-stage S=1000 (ms) | exhaustive (ms/query) | "
        "exhaustive top-10 kept, S=100 / S=1000 (%) | target R@1 / R@10: exhaustive; "
        "S=100; S=1000 (%) | queries (recall) | peak RSS (MB) |")
  print("|---|---|---|---|---|---|---|---|")
  results["search"] = []
  for n, q in sizes:
    r = run_child("search", n=n, num_recall_queries=q, shortlists=shortlists, reps=20,
                  tile=1024)
    results["search"].append(r)
    ts = {int(s): v for s, v in r["two_stage"].items()}
    tr = lambda d: f"{d['R@1']:.0f} / {d['R@10']:.0f}"  # noqa: E731
    print(f"| {n:,} | {ts[100]['median_ms']:.1f} | {ts[1000]['median_ms']:.1f} | "
          f"{r['exhaustive_ms_per_query']:,.0f} | {ts[100]['top10_kept']:.1f} / "
          f"{ts[1000]['top10_kept']:.1f} | {tr(r['exhaustive_target'])}; "
          f"{tr(ts[100]['target'])}; {tr(ts[1000]['target'])} | {q} | "
          f"{r['peak_rss_mb']:,.0f} |", flush=True)
  results["load_after"] = os.getloadavg()[0]
  print(f"\n1-min load average after: {results['load_after']:.1f}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
