r"""Fault injection for hade_jax: kills, stops, damaged checkpoints, NaNs, interrupted preparation.

  python -m tools.fault_harness --kills=12 --stops=10 --steps=30 --prepare_kills=9

runs every fault of tests/reliability_helpers.py (which tests/test_reliability.py runs short)
at full length, writes what it measured to tools/results/fault_harness.json and renders that
into the tables of RELIABILITY.md (between its `<!-- table:... -->` markers; the prose around
them is written by hand). `--render_only` re-renders the tables from the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from tests import preempt_cases  # noqa: E402
from tests import reliability_helpers as rh  # noqa: E402
from tools import markdown  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results" / "fault_harness.json"


@dataclasses.dataclass
class Run:
  """A harness run: its workdir, the prepared data and the table rows found so far."""

  root: pathlib.Path
  steps: int
  rng: random.Random
  data_dir: pathlib.Path = dataclasses.field(init=False)
  tokenizer_dir: pathlib.Path = dataclasses.field(init=False)
  faults: list[dict] = dataclasses.field(default_factory=list)
  kills: list[dict] = dataclasses.field(default_factory=list)
  stops: list[dict] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.logs = self.root / "logs"
    self.logs.mkdir(parents=True, exist_ok=True)
    self.data_dir = rh.prepare_tiny(self.root / "tfds")
    self.tokenizer_dir = rh.minilm_dir()
    self.env = rh.train_env(self.root / "compile_cache")

  def command_for(self, workdir: pathlib.Path) -> list[str]:
    return rh.train_command(workdir, self.data_dir, self.tokenizer_dir, total_steps=self.steps,
                            checkpoint_every_steps=1, keep_checkpoints=3)

  def row(self, fault: str, tries: str, outcome: str) -> None:
    self.faults.append({"fault": fault, "tries": tries, "outcome": outcome})
    logging.info("%s | %s | %s", fault, tries, outcome)

  def quote(self, text: str, n: int) -> str:
    text = text.replace(str(self.root), "$WORKDIR")
    return f"`{text[:n]}{'...' if len(text) > n else ''}`"


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  import jax
  import orbax.checkpoint as ocp

  return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores; "
          f"Python {platform.python_version()}, jax {jax.__version__}, orbax-checkpoint "
          f"{ocp.__version__}")


def train_modes(kills: int, rng: random.Random) -> list[str]:
  """The first kill before any checkpoint, then half aimed at checkpoint writes, half random."""
  rest = ["checkpoint write"] * ((kills - 1 + 1) // 2) + ["random"] * ((kills - 1) // 2)
  rng.shuffle(rest)
  return ["first step"] + rest


def kills_and_rerun(run: Run, kills: int) -> pathlib.Path:
  """Training killed `kills` times and rerun; returns the uninterrupted reference workdir."""
  reference, killed = run.root / "reference", run.root / "killed"
  _, _, ref_s = rh.run(run.command_for(reference), run.logs / "reference.log", env=run.env)
  command = run.command_for(killed)
  done, kill_s = rh.kill_and_resume(command, killed, train_modes(kills, run.rng), run.rng,
                                    run.logs, env=run.env, total_steps=run.steps)
  same = rh.assert_same_run(reference, killed, run.steps)
  phases = {p: sum(k.phase == p for k in done) for p in dict.fromkeys(k.phase for k in done)}
  aimed = sum(k.mode == "checkpoint write" for k in done)
  run.row("training killed (SIGKILL) and rerun", f"{len(done)} kills ({aimed} aimed at a "
          "checkpoint write); observed: " + ", ".join(f"{n} {p}" for p, n in phases.items()),
          f"final state ({same['arrays']} arrays: parameters, optimizer state, batch-norm "
          f"statistics, step) bit-identical to an uninterrupted run; the same clips at every one "
          f"of the {run.steps} steps ({same['repeated_steps']} steps rerun after kills saw the "
          f"same clips again); every metrics/batches line parses; "
          f"{len(same['leftover_partial'])} orbax temporary folders left. {kill_s:.0f} s with "
          f"kills vs {ref_s:.0f} s uninterrupted")
  run.kills = [dataclasses.asdict(k) for k in done]
  _, _, again_s = rh.run(command, run.logs / "after_completion.log", env=run.env)
  rh.assert_same_run(reference, killed, run.steps)
  assert rh.finished_steps(killed / "checkpoints")[-1] == run.steps
  run.row("rerun after completion", "1", f"exits 0 in {again_s:.0f} s (repeats the final "
          "evaluation); state, checkpoints and data log unchanged")
  return reference


def signal_stops(run: Run, reference: pathlib.Path, stops: int) -> None:
  """SIGTERM/SIGINT (what preemption sends) at random times, each followed by a rerun."""
  import signal

  def command(workdir):  # checkpoints only at the end: each stop's own save is what counts
    return rh.train_command(workdir, run.data_dir, run.tokenizer_dir, total_steps=run.steps,
                            checkpoint_every_steps=run.steps, keep_checkpoints=3)

  probe = preempt_cases.signal_once(command(run.root / "probe"), run.root / "probe",
                                    signal.SIGTERM, run.logs / "probe.log", after_steps=1,
                                    env=run.env)
  stopped = run.root / "stopped"
  done, seconds = preempt_cases.preempt_and_resume(
      command(stopped), stopped, stops, run.rng, run.logs, env=run.env,
      startup_s=probe.first_step_s if probe and probe.first_step_s else 20.0,
      total_steps=run.steps)
  same = rh.assert_same_run(reference, stopped, run.steps)
  clean = sum(s.clean for s in done)
  by_signal = ", ".join(f"{sum(s.signal == n for s in done)} {n}" for n in ("SIGTERM", "SIGINT"))
  phases = ", ".join(f"{sum(s.phase == p for s in done)} {p}" for p in ("startup", "steps"))
  run.row("training stopped by SIGTERM/SIGINT and rerun", f"{len(done)} stops ({by_signal}); "
          f"observed: {phases}",
          f"{clean}/{len(done)} clean (status 143/130, no traceback, the step reached saved); "
          f"{sum(s.lost for s in done)} steps lost; final state ({same['arrays']} arrays) "
          f"bit-identical to an uninterrupted run, the same clips at every step; exit at most "
          f"{max((s.exit_s for s in done), default=0):.1f} s after the signal; {seconds:.0f} s")
  run.stops = [dataclasses.asdict(s) for s in done]


def damaged_checkpoints(run: Run, reference: pathlib.Path) -> None:
  steps, root, logs = run.steps, run.root, run.logs
  for kind in ("truncated", "overwritten"):
    result = rh.damaged_resume_cli(reference, root / f"damaged_{kind}", run.command_for, steps,
                                   kind, logs / f"damaged_{kind}.log", run.env)
    run.row(f"newest checkpoint {kind} ({rh.DAMAGE[kind][0]}), then the same command", "1",
            f"warning, resumed from step {steps - 1}, the unreadable step renamed "
            f"{steps}.unreadable, step {steps} retrained: final state bit-identical to the "
            f"reference ({result['seconds']:.0f} s)")
  message = rh.all_damaged_cli(reference, root / "all_damaged", run.command_for,
                               logs / "all_damaged.log", run.env)
  run.row("every checkpoint overwritten, then the same command", "1",
          f"exits with an error, nothing deleted or restarted: {run.quote(message, 200)}")
  for kind, (what, _) in rh.DAMAGE.items():
    result = rh.damaged_checkpoint_falls_back(root / f"small_{kind.replace(' ', '_')}", kind)
    run.row(f"newest of 3 checkpoints: {what} (Checkpoints.restore_latest)", "1",
            f"falls back to step {result['restored']} with the warning "
            f"{run.quote(result['reason'], 220)}")
  rh.all_damaged_refuses(root / "small_all")
  reasons = rh.damaged_on_one_process(run.data_dir, run.tokenizer_dir, root / "two_processes")
  run.row("2 processes: process 1's saved data position of the newest step changed, then the "
          "same command", "1", f"both processes skip the step together (process 0: "
          f"{run.quote(reasons[0], 150)}; process 1: {run.quote(reasons[1], 200)}), resume from "
          "the step before and finish")
  needed = rh.orbax_alone_misses_overwritten_bytes(root / "small_orbax_alone")
  run.row("newest checkpoint overwritten, restored by orbax alone (without the checksums "
          "hade_jax saves in `meta`)", "1",
          "restored without an error, with wrong values: the checksums are needed" if needed
          else "orbax noticed the overwritten bytes by itself")


def nans(run: Run) -> None:
  stop = rh.nan_stops(run.data_dir, run.tokenizer_dir, run.root / "nan_stop")
  run.row("NaN clip at step 3, default (stop)", "1",
          f"NonFiniteError {run.quote(stop['message'], 230)}; checkpoints on disk "
          f"{stop['checkpoints']} (restore with checksums verified, finite)")
  skip = rh.nan_skipped(run.data_dir, run.tokenizer_dir, run.root / "nan_skip")
  run.row("NaN clip at step 3, skip_nonfinite_steps=True", "1",
          f"run completes; step 3 kept parameters, optimizer state and batch-norm statistics of "
          f"step 2 bit for bit; train/skipped_steps={skip['skipped_steps']:.0f} (also in the "
          "checkpoint)")
  message = rh.nan_too_many_skips(run.data_dir, run.tokenizer_dir, run.root / "nan_cap")
  run.row("NaN clips at steps 2 and 3, skip mode, max_consecutive_skips=2", "1",
          f"NonFiniteError {run.quote(message, 260)}")


def preparation_kills(run: Run, kills: int) -> None:
  reference = run.root / "prepare_reference"
  _, _, prep_s = rh.run(rh.prepare_command(reference), run.logs / "prepare_reference.log")
  modes = [list(rh.PREPARE_KILLS)[i % len(rh.PREPARE_KILLS)] for i in range(kills)]
  result = rh.kill_prepare_and_resume(reference, run.root / "prepare_killed", modes, run.rng,
                                      prep_s)
  observed = {}
  for k in result["kills"]:
    observed[k["phase"]] = observed.get(k["phase"], 0) + 1
  run.row("dataset preparation killed (SIGKILL) and rerun",
          f"{len(result['kills'])} kills over {result['preparations']} preparation(s); "
          "observed: " + ", ".join(f"{n} {p}" for p, n in observed.items()),
          f"every split's records byte-identical to an uninterrupted preparation "
          f"({', '.join(f'{s} {n}' for s, n in result['clips'].items())} clips, none twice); no "
          "work or incomplete folder left")


# ---------------------------------------------------------------------------------------------
# The results and RELIABILITY.md's tables.


def tables(results: dict) -> dict[str, str]:
  """RELIABILITY.md's generated tables from the harness's JSON results."""
  run = markdown.table(("run", "minutes", "machine", "command"), [(
      results["date"], f"{results['minutes']:.1f}", results["machine"],
      f"`{results['command']}`")])
  faults = markdown.table(("fault", "tries", "outcome"),
                          [(f["fault"], f["tries"], f["outcome"]) for f in results["faults"]])
  kills = markdown.table(
      ("kill", "aimed at", "observed", "after", "steps this run logged",
       "finished checkpoints after the kill", "its temporary folders left"),
      [(i + 1, k["mode"], k["phase"], f"{k['seconds']:.1f} s", k["new_steps"], k["checkpoints"],
        k["partial"] or "-") for i, k in enumerate(results["kills"])])
  stops = markdown.table(
      ("stop", "signal", "after", "phase", "exit status", "exit after the signal",
       "newest step started", "checkpoint saved", "steps lost", "traceback"),
      [(i + 1, s["signal"], f"{s['seconds']:.1f} s", s["phase"], s["status"],
        f"{s['exit_s']:.1f} s", s["last_step"], s["saved"], s["lost"],
        "yes" if s["traceback"] else "no") for i, s in enumerate(results.get("stops", []))])
  return {"fault_run": run, "faults": faults, "training_kills": kills, "signal_stops": stops}


def render(results_path: pathlib.Path, markdown_path: pathlib.Path) -> None:
  """Fills `markdown_path`'s marked tables from the JSON results at `results_path`."""
  results = json.loads(results_path.read_text())
  text = markdown.fill(markdown_path.read_text(), tables(results), str(markdown_path))
  markdown_path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=12, help="training kills")
  parser.add_argument("--stops", type=int, default=10, help="SIGTERM/SIGINT stops")
  parser.add_argument("--steps", type=int, default=30, help="training steps of the runs")
  parser.add_argument("--prepare_kills", type=int, default=9)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--results", default=str(RESULTS), help="the JSON results written")
  parser.add_argument("--out", default=str(ROOT / "RELIABILITY.md"),
                      help="the markdown whose marked tables are filled")
  parser.add_argument("--render_only", action="store_true",
                      help="run nothing: fill --out's tables from --results")
  parser.add_argument("--workdir", default="", help="keep everything here (default: a "
                      "temporary folder, removed at the end)")
  args = parser.parse_args(argv)
  if not args.render_only:
    results = run_all(args, argv if argv is not None else sys.argv[1:])
    pathlib.Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
  render(pathlib.Path(args.results), pathlib.Path(args.out))
  logging.info("wrote %s", args.out)
  return 0


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> dict:
  """Every fault; returns the JSON results."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for name in ("absl", "jax", "orbax", "hade_jax", "tensorboardX"):
    logging.getLogger(name).setLevel(logging.ERROR)
  started, wall = datetime.datetime.now(datetime.UTC), time.monotonic()
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fault_harness_"))
  run = Run(root, args.steps, random.Random(args.seed))
  reference = kills_and_rerun(run, args.kills)
  signal_stops(run, reference, args.stops)
  damaged_checkpoints(run, reference)
  nans(run)
  preparation_kills(run, args.prepare_kills)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return {"date": f"{started:%Y-%m-%d %H:%M} UTC", "minutes": (time.monotonic() - wall) / 60,
          "machine": machine(), "command": "python -m tools.fault_harness " + " ".join(argv),
          "faults": run.faults, "kills": run.kills, "stops": run.stops}


if __name__ == "__main__":
  sys.exit(main())
