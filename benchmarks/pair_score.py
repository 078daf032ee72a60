"""All-pairs HADE scoring, side by side: hade_jax today, hade_jax blocked, and PyTorch.

  python -m benchmarks.pair_score             # Clotho evaluation size, 1,045 x 5,225 (minutes)
  python -m benchmarks.pair_score --quick     # 209 x 1,045

Scores every (clip, caption) pair of a Clotho-size evaluation split with the demo model's heads
(joint width 256; THA levels of 64, 32 and 16 audio frames against 32 word tokens; 8 DCR
factors; synthetic features and random weights as in benchmarks/eval_search.py), in tiles of
`--tile` clips x `--tile` captions, by each implementation in a process of its own, one after
another in one run:

  jax_plain   `retrieval.score_tiled` over the heads' score as training computes it (the word-
              frame cosines of a tile as one [A, T, M, N] tensor, then two masked maxima)
  jax_full_width  the blocked score (`score(blocked=True)`): THA 'tokens' levels in blocks of
              clips, each block one matrix product in a [block N, M T] layout reduced in
              cache without masks (heads.TOKEN_BLOCK_CLIPS), every tile at the full 32 words
  jax         `retrieval.Encoder.score`, what eval and search run: the blocked score with the
              captions ordered by length and each text tile cut to its longest caption
              (retrieval.WORD_BUCKET), so padding words are not multiplied
  torch       the same score written in PyTorch (float32, same weights), tile by tile: the
              side-by-side reference
  torch_bf16  PyTorch with the word-frame products in bfloat16 (oneDNN uses AMX where the
              CPU has it), the rest float32
  jax_bf16    hade_jax with the level tokens in bfloat16 (XLA:CPU has no AMX path, so this
              measures whether halving the memory traffic helps)

Every process keeps the host memory it frees (hade_jax/host_memory.py, as the eval
command does), so no implementation pays for fresh pages per tile. Every process measures its
own matmul peak (2,048^3 float32, and bfloat16 for the bf16 runs)
before and after scoring, so the fraction of peak is against what that process could get.
Scores are compared with `jax_plain` (max abs difference) and so are the rankings (for each
caption, how many of its top 10 clips by `jax_plain` the implementation keeps, and the mean
T2A R@1/R@10 change against a synthetic ground truth: caption i belongs to clip i // 5).
The THA word-frame products are counted as the work: 2 A T M (N_1 + N_2 + N_3) D FLOP at the
full width M = 32 ("THA GFLOP/s": the rate of the whole score); for `jax` and `jax_bf16`, which
skip padding words, the products actually executed are counted too ("executed GFLOP/s"), and
the fraction of peak is taken of those. The synthetic captions have 8-20 valid words of 32.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from benchmarks import eval_search

IMPLS = ("jax_plain", "jax_full_width", "jax", "torch", "torch_bf16", "jax_bf16")


def tha_flop(clips: int, captions: int) -> float:
  return 2.0 * clips * captions * eval_search.WORDS * sum(eval_search.LEVEL_FRAMES) * 256


def _features(clips: int, captions: int):
  return eval_search._random_split(np.random.default_rng(0), clips, captions)


def _probe(dtype: str) -> float:
  """GFLOP/s of a 2,048^3 matmul in this process (median of 5, after a warm-up)."""
  n = 2048
  if dtype.startswith("torch"):
    import torch

    x = torch.ones(n, n, dtype=torch.bfloat16 if dtype.endswith("bf16") else torch.float32)
    run = lambda: x @ x  # noqa: E731
  else:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), jnp.bfloat16 if dtype.endswith("bf16") else jnp.float32)
    f = jax.jit(lambda x: x @ x)
    run = lambda: f(x).block_until_ready()  # noqa: E731
  run()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / float(np.median(times)) / 1e9


# ---------------------------------------------------------------------------------------------
# hade_jax.


def _jax_scorer(impl: str, model) -> Callable:
  """score(audio, text, tile) -> [A, T] for the JAX implementations."""
  import jax
  from flax import nnx

  from hade_jax import retrieval

  if impl in ("jax", "jax_bf16"):
    enc = retrieval.Encoder(model)
    return lambda audio, text, tile: enc.score(audio, text, tile=tile)
  graphdef, state = nnx.split(model)
  blocked = impl == "jax_full_width"
  fn = jax.jit(lambda s, a, t: nnx.merge(graphdef, s).score(a, t, blocked=blocked)["total"])
  return lambda audio, text, tile: retrieval.score_tiled(lambda a, t: fn(state, a, t), audio,
                                                         text, tile=tile)


def _text_tiles(text, tile: int) -> list[tuple[np.ndarray, int]]:
  """(rows, cut width) of each text tile `retrieval.Encoder.score` runs on `text`."""
  from hade_jax import retrieval

  widths, order = retrieval.text_widths(text), retrieval.length_order(text)
  return [(rows, retrieval.cut_width(widths[rows]))
          for rows in np.split(order, range(tile, len(order), tile))]


def executed_flop(impl: str, text, clips: int, tile: int) -> float:
  """The THA products `impl` executes: the full width, or each sorted text tile's cut width."""
  if impl not in ("jax", "jax_bf16"):
    return tha_flop(clips, len(text.global_TxD))
  words = sum(len(rows) * width for rows, width in _text_tiles(text, tile))
  return tha_flop(clips, words) / eval_search.WORDS


def run_jax(impl: str, audio, text, tile: int) -> tuple[np.ndarray, dict]:
  import jax
  import jax.numpy as jnp

  if impl == "jax_bf16":
    audio = audio.replace(levels=tuple(x.astype(jnp.bfloat16) for x in audio.levels))
    text = text.replace(levels=tuple(x.astype(jnp.bfloat16) for x in text.levels))
  score = _jax_scorer(impl, eval_search._demo_model())
  t0 = time.perf_counter()
  # Compiles every tile shape: the sorted text's first rows of each width bucket.
  first_audio = jax.tree.map(lambda x: x[:tile], audio)
  for t_rows in _bucket_heads(text, tile):
    score(first_audio, jax.tree.map(lambda x, rows=t_rows: x[rows], text), tile)
  t1 = time.perf_counter()
  scores = score(audio, text, tile)
  return scores, {"compile_s": t1 - t0, "score_s": time.perf_counter() - t1}


def _bucket_heads(text, tile: int) -> list[np.ndarray]:
  """Row sets of `tile` captions, one per text tile shape the scoring will meet."""
  seen: dict[int, np.ndarray] = {}
  for rows, width in _text_tiles(text, tile):
    seen.setdefault(width, rows)
  return list(seen.values())


# ---------------------------------------------------------------------------------------------
# PyTorch: the same all-pairs score (heads.HadeHeads.score, level_sim='tokens').


def _torch_weights(model) -> dict:
  import jax
  import torch

  heads = model.heads
  cfg = heads.cfg
  conf = heads.dcr.confidence
  t = lambda x: torch.from_numpy(np.array(x[...], np.float32))  # noqa: E731
  return {"level_weights": torch.from_numpy(np.asarray(jax.device_get(heads.level_weights()))),
          "w1": t(conf.linear1.kernel), "b1": t(conf.linear1.bias),
          "w2": t(conf.linear2.kernel)[:, 0], "b2": t(conf.linear2.bias)[0],
          "global_weight": cfg.global_weight, "dcr_weight": cfg.dcr_weight}


def _torch_level(a, amask, alogit, t, tmask, tlogit, bf16: bool):
  import torch

  (na, n, d), (nt, m, _) = a.shape, t.shape
  lhs, rhs = a.reshape(na * n, d), t.reshape(nt * m, d).T
  if bf16:
    lhs, rhs = lhs.bfloat16(), rhs.bfloat16()
  cos = (lhs @ rhs).float().view(na, n, nt, m)
  t2a = cos.masked_fill(~amask[:, :, None, None], -1e4).amax(1)  # [A, T, M]
  a2t = cos.masked_fill(~tmask[None, None], -1e4).amax(3)  # [A, N, T]
  wt = torch.softmax(tlogit.masked_fill(~tmask, float("-inf")), -1)
  wa = torch.softmax(alogit.masked_fill(~amask, float("-inf")), -1)
  t_part = (t2a * (tmask * wt)[None]).sum(-1)
  a_part = (a2t * (amask * wa)[:, :, None]).sum(1)
  return 0.5 * (t_part + a_part)


def _torch_tile(w: dict, a: dict, t: dict, bf16: bool):
  import torch
  import torch.nn.functional as F

  total = w["global_weight"] * (F.normalize(a["global"], dim=-1)
                                @ F.normalize(t["global"], dim=-1).T)
  for i, lw in enumerate(w["level_weights"]):
    total += lw * _torch_level(a["levels"][i], a["masks"][i], a["logits"][i], t["levels"][i],
                               t["masks"][i], t["logits"][i], bf16)
  fa, ft = F.normalize(a["factors"], dim=-1), F.normalize(t["factors"], dim=-1)
  cos = torch.einsum("akd,tkd->atk", fa, ft)
  d = fa.shape[-1]
  h = torch.relu((fa @ w["w1"][d:])[:, None] + (ft @ w["w1"][:d])[None] + w["b1"])
  conf = h @ w["w2"] + w["b2"]
  return total + w["dcr_weight"] * (conf * cos).sum(-1)


def _torch_rows(f, start: int, stop: int, global_name: str, factor_name: str) -> dict:
  import torch

  g = lambda x: torch.from_numpy(np.ascontiguousarray(x[start:stop]))  # noqa: E731
  return {"global": g(getattr(f, global_name)), "factors": g(getattr(f, factor_name)),
          "levels": [g(x) for x in f.levels], "masks": [g(x) for x in f.level_masks],
          "logits": [g(x) for x in f.level_logits]}


def run_torch(impl: str, audio, text, tile: int) -> tuple[np.ndarray, dict]:
  import torch

  torch.set_num_threads(os.cpu_count())
  w = _torch_weights(eval_search._demo_model())
  bf16 = impl == "torch_bf16"
  num_a, num_t = len(audio.global_AxD), len(text.global_TxD)
  out = np.zeros((num_a, num_t), np.float32)
  with torch.inference_mode():
    t0 = time.perf_counter()
    _torch_tile(w, _torch_rows(audio, 0, tile, "global_AxD", "factors_AxKxd"),
                _torch_rows(text, 0, tile, "global_TxD", "factors_TxKxd"), bf16)  # warm-up
    t1 = time.perf_counter()
    for a0 in range(0, num_a, tile):
      a = _torch_rows(audio, a0, a0 + tile, "global_AxD", "factors_AxKxd")
      for t0_ in range(0, num_t, tile):
        t = _torch_rows(text, t0_, t0_ + tile, "global_TxD", "factors_TxKxd")
        out[a0:a0 + tile, t0_:t0_ + tile] = _torch_tile(w, a, t, bf16).numpy()
  return out, {"compile_s": t1 - t0, "score_s": time.perf_counter() - t1}


# ---------------------------------------------------------------------------------------------
# Driver.


def child(impl: str, clips: int, captions: int, tile: int, scores_path: str) -> dict:
  from hade_jax import host_memory

  host_memory.keep_freed_pages()  # as the eval command; every process alike, PyTorch's too
  audio, text = _features(clips, captions)
  probe = "torch" if impl.startswith("torch") else "jax"
  peak_before = _probe(probe)
  bf16_peak = _probe(probe + "_bf16") if impl.endswith("bf16") else None
  run = run_torch if impl.startswith("torch") else run_jax
  scores, timing = run(impl, audio, text, tile)
  np.save(scores_path, scores)
  peak = max(peak_before, _probe(probe))
  gflops = tha_flop(clips, captions) / timing["score_s"] / 1e9
  done = executed_flop(impl, text, clips, tile) / timing["score_s"] / 1e9
  return {"impl": impl, "clips": clips, "captions": captions, "tile": tile, **timing,
          "tha_gflops": gflops, "executed_gflops": done, "matmul_gflops": peak,
          "bf16_matmul_gflops": bf16_peak, "fraction_of_peak": done / peak,
          "load": os.getloadavg()[0]}


def _run_child(impl: str, **kwargs) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.pair_score", "--child", json.dumps([impl, kwargs])]
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{impl} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(reference_AxT: np.ndarray, scores_AxT: np.ndarray, per_clip: int = 5) -> dict:
  """Max |difference|, the share of each caption's reference top 10 kept, R@1/R@10 change."""
  k = 10
  ref_top = np.argsort(-reference_AxT, axis=0, kind="stable")[:k].T  # [T, k]
  top = np.argsort(-scores_AxT, axis=0, kind="stable")[:k].T
  kept = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, top, strict=True)])
  target_T = np.arange(scores_AxT.shape[1]) // per_clip

  def recall(t):
    return {f"R@{n}": 100 * float((t[:, :n] == target_T[:, None]).any(1).mean()) for n in (1, 10)}

  r_ref, r = recall(ref_top), recall(top)
  return {"max_abs_diff": float(np.abs(reference_AxT - scores_AxT).max()),
          "top10_kept": 100 * float(kept),
          "recall_change": {key: r[key] - r_ref[key] for key in r}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="209 clips x 1,045 captions")
  parser.add_argument("--tile", type=int, default=128)
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--out", default="", help="JSON results file")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    impl, kwargs = json.loads(args.child)
    print(json.dumps(child(impl, **kwargs)))
    return
  clips, captions = (209, 1045) if args.quick else (1045, 5225)
  results = {"machine": eval_search.machine(), "quick": args.quick, "tile": args.tile,
             "tha_gflop": tha_flop(clips, captions) / 1e9, "command": " ".join(
                 ["python -m benchmarks.pair_score"] + (argv or sys.argv[1:])),
             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": os.getloadavg()[0],
             "runs": []}
  print(f"{results['machine']}: {clips:,} clips x {captions:,} captions, tile {args.tile}, "
        f"THA products {results['tha_gflop']:,.0f} GFLOP", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    reference = None
    for impl in args.impls.split(","):
      path = os.path.join(tmp, f"{impl}.npy")
      r = _run_child(impl, clips=clips, captions=captions, tile=args.tile, scores_path=path)
      scores = np.load(path)
      reference = scores if reference is None else reference
      r["agreement"] = agreement(reference, scores)
      results["runs"].append(r)
      print(json.dumps(r), flush=True)
  results["load_after"] = os.getloadavg()[0]
  print(table(results))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


def target_values(res: dict) -> dict[str, float]:
  """{measure: value} for benchmarks/targets.json rows with "source": "pair_score" (full size
  only: the --quick split is not the target's)."""
  runs = {r["impl"]: r for r in res["runs"]}
  if res["quick"] or "jax" not in runs:
    return {}
  r = runs["jax"]
  return {"clotho_scoring_s": r["score_s"],
          "clotho_scoring_peak_fraction": r["fraction_of_peak"]}


def run_table(res: dict) -> str:
  return ("| date | split | machine | tile | 1-min load average at the start | at the end |\n"
          "|---|---|---|---|---|---|\n"
          f"| {res['date'][:10]} | {'quick' if res['quick'] else 'full'} | {res['machine']} | "
          f"{res['tile']} | {res['load_before']:.1f} | {res['load_after']:.1f} |\n")


def table(res: dict) -> str:
  """The side-by-side table (BENCHMARKS.md, pair_score/scoring)."""
  runs = {r["impl"]: r for r in res["runs"]}
  base = runs.get("jax_plain") or res["runs"][0]
  torch_s = runs["torch"]["score_s"] if "torch" in runs else float("nan")
  lines = ["| implementation | scoring (s) | speed-up over hade_jax before | over PyTorch "
           "float32 | THA GFLOP/s | executed GFLOP/s | fraction of the process's matmul peak "
           "(executed) | max abs score difference | top 10 kept | T2A R@1 / R@10 change "
           "(points) |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n"]
  for r in res["runs"]:
    a = r["agreement"]
    peak = r["bf16_matmul_gflops"] or r["matmul_gflops"]
    lines.append(
        f"| {r['impl']} | {r['score_s']:.1f} | {base['score_s'] / r['score_s']:.2f}x | "
        f"{torch_s / r['score_s']:.2f}x | {r['tha_gflops']:.0f} | "
        f"{r.get('executed_gflops', r['tha_gflops']):.0f} | "
        f"{100 * r.get('executed_gflops', r['tha_gflops']) / peak:.0f} % of {peak:.0f} | "
        f"{a['max_abs_diff']:.1e} | "
        f"{a['top10_kept']:.1f} % | {a['recall_change']['R@1']:+.2f} / "
        f"{a['recall_change']['R@10']:+.2f} |\n")
  return "".join(lines)


if __name__ == "__main__":
  main()
