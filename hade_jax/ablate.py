"""Multi-seed ablations: `python -m hade_jax.ablate`.

  python -m hade_jax.ablate --config=configs/demo.py --variants=global,tha,dcr,full \
      --seeds=0,1,2 --baseline=global --workdir=/tmp/demo_ablation [--config.KEY=VALUE ...]

Trains every variant (an `ablation=` argument of the config file, e.g. configs/base.py's
ABLATIONS) with every seed, one run after another, each by the trainer's own command
(`python -m hade_jax.train` in a child process: the devices' memory is returned after each run,
and a crash ends that run only) in WORKDIR/<variant>/seed_<seed>. `--config.KEY=VALUE`
overrides go to every run; the seed is `--config.seed`.

Rerunning the same command continues where it stopped: a run whose test results exist (and
check out: `test_results.read`) is skipped; an unfinished one is started again in its workdir,
where the trainer resumes exactly from its last checkpoint. A run that fails (exit 1) is
reported with its error and log and the others go on; a config error (exit 2) or an interrupt
stops at once.

Results: WORKDIR/ablation.json (every run: variant, seed, metrics, wall time, workdir, status;
and the summary) and WORKDIR/ablation.md (mean ± std per metric and variant; each variant's
difference from --baseline with a paired bootstrap 95 % interval over the test queries; the
procedure: hade_jax/ablation_stats.py). Each run's output is in its workdir's `ablate.log`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import flags

from hade_jax import ablation_stats, cli, test_results

log = logging.getLogger("hade_jax.ablate")
RESULTS_JSON = "ablation.json"
RESULTS_MD = "ablation.md"
RUN_RECORD = "ablate_run.json"  # in each run's workdir: its arguments and attempts
RUN_LOG = "ablate.log"  # in each run's workdir: the training command's output


def define_flags(fv: flags.FlagValues) -> None:
  cli.define_config_flag(fv, required=True, help_text="Config file (without ablation=), e.g. "
                         "configs/demo.py; --config.KEY=VALUE overrides go to every run.")
  flags.DEFINE_string("workdir", None, "Runs go to WORKDIR/<variant>/seed_<seed>; the results "
                      f"to WORKDIR/{RESULTS_JSON} and WORKDIR/{RESULTS_MD}.", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)
  flags.DEFINE_list("variants", ["global", "tha", "dcr", "full"], "The config's ablation= "
                    "values to run, in order.", flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) of every variant.",
                    flag_values=fv)
  flags.DEFINE_string("baseline", None, "The variant differences are taken from (default: the "
                      "first of --variants).", flag_values=fv)
  flags.DEFINE_list("metrics", list(ablation_stats.DEFAULT_METRICS), "Test metrics in the "
                    "table (keys of test_metrics.json; t2a/* and a2t/* get intervals).",
                    flag_values=fv)
  flags.DEFINE_integer("bootstrap_samples", ablation_stats.NUM_SAMPLES, "Bootstrap replicates.",
                       lower_bound=100, flag_values=fv)
  flags.DEFINE_integer("bootstrap_seed", 0, "numpy seed of the bootstrap.", flag_values=fv)


def _plan(fv: flags.FlagValues, argv: Sequence[str]) -> tuple[str, list[str], list[int]]:
  """(config file spec, the --config.KEY=VALUE overrides, seeds), checked."""
  given = [a.split("=", 1)[1] if a.startswith("--config=") else argv[i + 1]
           for i, a in enumerate(argv) if a.startswith("--config=") or a == "--config"]
  spec = given[-1]
  path, _, arg = spec.partition(":")
  if "ablation=" in arg:
    raise cli.UsageError(f"--config={spec}: give the config without ablation= (the variants "
                         "come from --variants)")
  overrides = [a for a in argv if a.startswith("--config.")]
  for a in overrides:
    if "=" not in a:
      raise cli.UsageError(f"{a}: write overrides as --config.KEY=VALUE")
    if a.partition("=")[0] == "--config.seed":
      raise cli.UsageError(f"{a}: the seeds come from --seeds")
  try:
    seeds = [int(s) for s in fv.seeds]
  except ValueError:
    raise cli.UsageError(f"--seeds={','.join(fv.seeds)}: expected whole numbers, e.g. "
                         "--seeds=0,1,2") from None
  for name, values in (("variants", fv.variants), ("seeds", seeds)):
    if not values or len(set(values)) != len(values):
      raise cli.UsageError(f"--{name}: expected distinct values, got {values}")
  baseline = fv.baseline or fv.variants[0]
  if baseline not in fv.variants:
    raise cli.UsageError(f"--baseline={baseline} is not one of --variants={fv.variants}")
  return spec, overrides, seeds


def train_argv(spec: str, variant: str, seed: int, overrides: Sequence[str],
               workdir: pathlib.Path) -> list[str]:
  """The `python -m hade_jax.train` arguments of one run."""
  path, _, arg = spec.partition(":")
  arg = ",".join(filter(None, [arg, f"ablation={variant}"]))
  return [f"--config={path}:{arg}", f"--workdir={workdir}", *overrides, f"--config.seed={seed}"]


def run_dir(workdir: pathlib.Path, variant: str, seed: int) -> pathlib.Path:
  return workdir / variant / f"seed_{seed}"


def _check_variants(spec: str, variants: Sequence[str], overrides: Sequence[str],
                    workdir: pathlib.Path) -> None:
  """Every variant's command line parses as the trainer parses it (usage errors now, not
  after hours of other runs)."""
  from hade_jax import train

  for v in variants:
    argv = train_argv(spec, v, 0, overrides, run_dir(workdir, v, 0))
    try:
      cli.parse(train.define_flags, argv, doc="", prog="python -m hade_jax.train")
    except cli.UsageError as e:
      # The config file's own error (e.g. an unknown ablation) comes with its traceback.
      message = str(e).strip().splitlines()[-1] if "Traceback" in str(e) else str(e)
      raise cli.UsageError(f"variant {v!r} ({argv[0]}): {message}") from None


def _read_record(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {"attempts": []}
  except json.JSONDecodeError:  # torn by a kill: the attempts' wall times are lost, not the run
    return {"attempts": []}


def _write_record(path: pathlib.Path, record: dict) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(record, indent=2))
  os.replace(tmp, path)


def _last_error(log_path: pathlib.Path) -> str:
  """The child's one-line error (cli.run prints 'error: ...'), else its last line."""
  lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
  errors = [line for line in lines if line.startswith("error: ")]
  return (errors[-1][len("error: "):] if errors else (lines[-1] if lines else "no output"))


def train_one(argv: Sequence[str], directory: pathlib.Path) -> tuple[int, float]:
  """Runs the trainer's command in a child process, its output appended to the run's log;
  returns (exit status, wall seconds)."""
  directory.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with open(directory / RUN_LOG, "a") as out:
    out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m hade_jax.train "
              f"{' '.join(argv)}\n")
    out.flush()
    child = subprocess.Popen([sys.executable, "-m", "hade_jax.train", *argv], stdout=out,
                             stderr=subprocess.STDOUT)
    try:
      status = child.wait()
    except KeyboardInterrupt:
      # Ctrl-C reached the child too: let it save the checkpoint of its step (it exits 130;
      # the next ablate resumes from there) instead of killing it as subprocess.run would.
      child.wait()
      raise
  return status, time.perf_counter() - t0


def run_one(spec: str, variant: str, seed: int, overrides: Sequence[str],
            workdir: pathlib.Path) -> dict:
  """One run, skipped when finished: {'variant', 'seed', 'workdir', 'status', 'metrics',
  'wall_s', 'attempts', 'error'} ('status': 'finished' or 'failed')."""
  directory = run_dir(workdir, variant, seed)
  argv = train_argv(spec, variant, seed, overrides, directory)
  record_path = directory / RUN_RECORD
  record = _read_record(record_path)
  command = [a for a in argv if not a.startswith("--workdir=")]  # the folder may move
  finished = test_results.is_finished(directory)
  if finished and record.get("command", command) != command:
    raise cli.UsageError(
        f"{directory} holds a run finished with other settings ({' '.join(record['command'])})"
        "; use another --workdir for these settings, or delete that folder to retrain it")
  if not finished:
    log.info("%s seed %d: training in %s", variant, seed, directory)
    status, wall = train_one(argv, directory)
    record["command"] = command
    record["attempts"] = [*record.get("attempts", []), {"status": status, "wall_s": wall}]
    _write_record(record_path, record)
    if status in (130, 143):  # the user's Ctrl-C / a SIGTERM reached the child too
      raise KeyboardInterrupt
    if status == 2:
      raise cli.UsageError(f"{variant} seed {seed}: {_last_error(directory / RUN_LOG)} "
                           f"(log: {directory / RUN_LOG})")
  else:
    log.info("%s seed %d: finished before, skipped (%s)", variant, seed, directory)
  out = {"variant": variant, "seed": seed, "workdir": str(directory),
         "wall_s": sum(a["wall_s"] for a in record.get("attempts", [])),
         "attempts": len(record.get("attempts", [])), "metrics": None, "error": None}
  try:
    out["metrics"], out["ranks"] = test_results.read(directory)
    out["metrics"] |= _selected_validation(directory)
    out["status"] = "finished"
  except (FileNotFoundError, test_results.IncompleteResultsError) as e:
    out["status"] = "failed"
    out["error"] = str(e) if not isinstance(e, FileNotFoundError) else _no_results(
        directory, record["attempts"][-1]["status"])
    log.error("%s seed %d failed: %s", variant, seed, out["error"])
  return out


def _selected_validation(directory: pathlib.Path) -> dict[str, float]:
  """The validation metrics ('val/...') of the checkpoint the test evaluated: a default is
  chosen on these (--metrics=val/t2a/R@10,...), never on the test split's."""
  from hade_jax.checkpoints import paths
  from hade_jax.report import runlog

  try:
    step = int(paths.step_dir(directory, "best").name)
  except (FileNotFoundError, ValueError):
    return {}
  return runlog.validation_at(directory, step)


def _no_results(directory: pathlib.Path, status: int) -> str:
  if status == 0:  # trained, but the config names no test split
    return (f"{directory} has no {test_results.METRICS_FILE}: the run ended without a test "
            "evaluation; the config must name a test split (--config.final_eval_split=test)")
  return f"{_last_error(directory / RUN_LOG)} (exit {status}; log: {directory / RUN_LOG})"


def _json_safe(x):
  """NaN (a std of one seed) as null: strict JSON readers refuse NaN."""
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_json_safe(v) for v in x]
  return x


def report(runs: Sequence[dict], fv: flags.FlagValues, spec: str, overrides: Sequence[str],
           workdir: pathlib.Path) -> dict:
  """Writes WORKDIR/ablation.json and ablation.md from the finished runs; returns the summary."""
  done = [r for r in runs if r["status"] == "finished"]
  summary = ablation_stats.summarize(
      done, {(r["variant"], r["seed"]): r["ranks"] for r in done},
      baseline=fv.baseline or fv.variants[0], metric_names=fv.metrics,
      num_samples=fv.bootstrap_samples, seed=fv.bootstrap_seed) if done else {}
  results = {"config": spec, "overrides": list(overrides), "variants": list(fv.variants),
             "seeds": [int(s) for s in fv.seeds],
             "runs": [{k: v for k, v in r.items() if k != "ranks"} for r in runs],
             "summary": summary}
  _write_record(workdir / RESULTS_JSON, _json_safe(results))
  if summary:
    title = f"Ablation of `{spec}`" + (f" ({' '.join(overrides)})" if overrides else "")
    (workdir / RESULTS_MD).write_text(ablation_stats.render_markdown(summary, title=title))
  return summary


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs the ablation the command line describes; returns the summary."""
  argv = list(sys.argv[1:] if argv is None else argv)
  fv, rest = cli.parse(define_flags, argv, doc=__doc__, prog="python -m hade_jax.ablate")
  if rest:
    raise cli.UsageError(f"unexpected arguments: {rest}")
  cli.setup_logging()
  spec, overrides, seeds = _plan(fv, argv)
  workdir = pathlib.Path(fv.workdir).expanduser().absolute()
  _check_variants(spec, fv.variants, overrides, workdir)
  runs = []
  for v in fv.variants:
    for s in seeds:
      runs.append(run_one(spec, v, s, overrides, workdir))
  summary = report(runs, fv, spec, overrides, workdir)
  log.info("results in %s and %s", workdir / RESULTS_JSON, workdir / RESULTS_MD)
  if summary:
    print(ablation_stats.render_markdown(summary))
  failed = [f"{r['variant']} seed {r['seed']}: {r['error']}" for r in runs
            if r["status"] != "finished"]
  if failed:
    raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed (the others are in the "
                       f"table; rerun the command to retry): " + "; ".join(failed))
  return summary


if __name__ == "__main__":
  cli.main_entry(main)
