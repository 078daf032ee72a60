"""Runs the benchmarks and regenerates BENCHMARKS.md.

  python -m benchmarks.run --quick            # ~5 min: hade_jax vs PyTorch on this CPU
  python -m benchmarks.run                    # the full suite: comparison, pipeline, eval/search
  python -m benchmarks.run --device=gpu --quick  # the comparison on a GPU, bfloat16, ~6 min
  python -m benchmarks.run --quick --dropout_rng=rbg --jax_xla_flags='--xla_cpu_...'
                                              # the same with hade_jax's dropout PRNG / XLA flags
  python -m benchmarks.render                 # refill BENCHMARKS.md's tables from the saved results

Each section writes its results to `benchmarks/results/<section>.json` (with the date, the
machine and the command); `benchmarks/render.py` then fills BENCHMARKS.md's marked tables from
every results file present (the prose around them is written by hand), so a section not re-run
keeps its last measurement.
Sections:
  compare      hade_jax against the PyTorch reference (benchmarks/compare.py)
  pipeline     records -> device-ready batches (benchmarks/input_pipeline.py)
  eval_search  full scoring and two-stage search (benchmarks/eval_search.py)
`--quick` runs `compare` alone at its quick sizes (the other two take minutes to hours at the
sizes their tables report; run them with --sections=pipeline,eval_search).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from benchmarks import compare, render

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers")

# Sizes: batch, interleaved rounds and repetitions (BENCHMARKS.md states them).
PLANS = {
    ("cpu", True): (dict(batch=8), compare.Plan(
        train_rounds=4, train_steps=1, embed_rounds=3, part_rounds=3, matmul_reps=3)),
    # Batch 8 in full runs too: the three training workers (~7, ~8 and ~5 GB at batch 8)
    # must fit in memory at once; more rounds and steps instead.
    ("cpu", False): (dict(batch=8), compare.Plan(
        train_rounds=10, train_steps=2, embed_rounds=6, embed_reps=2, part_rounds=5,
        matmul_reps=5)),
    ("gpu", True): (dict(batch=64, matmul_size=8192), compare.Plan(
        train_rounds=5, train_steps=5, warmup_steps=3, embed_rounds=5, embed_reps=5,
        part_rounds=5, part_reps=5, matmul_reps=10, pause_s=0.1)),
    ("gpu", False): (dict(batch=128, matmul_size=8192), compare.Plan(
        train_rounds=10, train_steps=10, warmup_steps=3, embed_rounds=10, embed_reps=10,
        part_rounds=10, part_reps=10, matmul_reps=20, pause_s=0.1)),
}


def machine() -> dict:
  """CPU model, cores, memory, load and package versions of this machine."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  versions = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
          "platform": platform.platform(), "versions": versions}


def _gpu_name() -> str:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip().splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError):
    return "unknown GPU"


def wait_for_load(limit: float, timeout_s: float):
  """Waits (up to timeout_s) for the 1-minute load average to drop to `limit`."""
  t = time.time()
  while os.getloadavg()[0] > limit and time.time() - t < timeout_s:
    print(f"1-min load average {os.getloadavg()[0]:.2f} > {limit}: waiting", flush=True)
    time.sleep(30)


def run_compare(device: str, quick: bool, command: str, **spec_overrides) -> dict:
  """The comparison at PLANS' sizes; `spec_overrides` are compare.Spec fields (dropout_rng,
  jax_xla_flags, compute_dtype) that differ from the plan's."""
  spec_kw, plan = PLANS[(device, quick)]
  spec = compare.full_spec(device=device, **(spec_kw | spec_overrides))
  meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": command, "quick": quick, "device": device, "machine": machine(),
          "load_before": os.getloadavg()}
  if device == "gpu":
    meta["machine"]["gpu"] = _gpu_name()
  print(f"compare on {device}: batch {spec.batch}, {plan}", flush=True)
  res = compare.run(spec, plan, log=lambda s: print(s, flush=True))
  meta["load_after"] = os.getloadavg()
  return meta | res


def run_script(args: list[str], out: pathlib.Path, command: str, quick: bool) -> dict:
  """Runs a benchmark script that writes JSON to `out`; adds the run's metadata."""
  load_before = os.getloadavg()
  t = time.time()
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
  res = json.loads(out.read_text())
  res.setdefault("meta", {}).update({
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": command, "quick": quick, "machine": machine(), "wall_s": time.time() - t,
      "load_before_run": load_before, "load_after_run": os.getloadavg()})
  return res


def load_results() -> dict:
  return render.load_results(RESULTS)


def save(name: str, res: dict):
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the comparison alone, quick sizes")
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--sections", default=None,
                      help="comma-separated sections to re-run (default: compare under --quick, "
                           "else all three); empty = re-render only")
  parser.add_argument("--data_dir", default="/tmp/hade_bench",
                      help="pipeline section: where synthcaps is prepared if missing")
  parser.add_argument("--wait_load", type=float, default=0.0,
                      help="wait (up to 10 min) for the 1-min load average to fall below this")
  parser.add_argument("--dropout_rng", default="threefry2x32",
                      help="compare: hade_jax's config.dropout_rng (threefry2x32 or rbg)")
  parser.add_argument("--jax_xla_flags", default="",
                      help="compare: extra XLA_FLAGS of the JAX workers, e.g. "
                           "'--xla_cpu_use_thunk_runtime=false' (PyTorch runs beside them)")
  parser.add_argument("--keep_freed_memory", default="true", choices=("true", "false"),
                      help="compare: hade_jax's config.keep_freed_memory (the trainer's default "
                           "is false; this step runs faster with true)")
  parser.add_argument("--results_name", default="",
                      help="compare: save as benchmarks/results/NAME.json (default compare_DEVICE, "
                           "the file BENCHMARKS.md's tables read; another name keeps a variant's "
                           "run apart from them)")
  parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
  args = parser.parse_args(argv)
  command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
  sections = args.sections
  if sections is None:
    sections = "compare" if args.quick or args.device == "gpu" else "compare,pipeline,eval_search"
  sections = [s for s in sections.split(",") if s]
  unknown = set(sections) - {"compare", "pipeline", "eval_search"}
  if unknown:
    parser.error(f"unknown sections {sorted(unknown)}")
  if args.wait_load:
    wait_for_load(args.wait_load, 600)

  t0 = time.time()
  if "compare" in sections:
    res = run_compare(args.device, args.quick, command, dropout_rng=args.dropout_rng,
                      jax_xla_flags=args.jax_xla_flags,
                      keep_freed_memory=args.keep_freed_memory == "true")
    save(args.results_name or f"compare_{args.device}", res)
    target = render.derived(res)["target"]
    print(f"compare: hade_jax / PyTorch {target['speedup']:.2f}x, full HADE extra "
          f"{100 * target['overhead']:+.1f} %, fraction of the JAX matmul peak "
          f"{100 * target['fraction']:.0f} % (median over the quiet rounds)", flush=True)
  if "pipeline" in sections:
    out = RESULTS / "input_pipeline.json"
    extra = ["--batches=10", "--workers=0,2"] if args.quick else []
    res = run_script(["benchmarks/input_pipeline.py", f"--data_dir={args.data_dir}",
                      f"--out={out}", *extra], out, command, args.quick)
    save("input_pipeline", res)
  if "eval_search" in sections:
    name = "eval_search_quick" if args.quick else "eval_search"
    out = RESULTS / f"{name}.json"
    res = run_script(["-m", "benchmarks.eval_search", f"--out={out}",
                      *(["--quick"] if args.quick else [])], out, command, args.quick)
    save(name, res)
  out = pathlib.Path(args.out)
  text = out.read_text()
  if "compare" in sections and args.device == "gpu" and not args.results_name:
    text = render.add_gpu_markers(text)  # the first GPU run: its tables get their places
  out.write_text(render.render(load_results(), text, str(out)))
  print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  main()
