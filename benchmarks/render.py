"""BENCHMARKS.md's tables from the results in benchmarks/results/*.json.

BENCHMARKS.md is written by hand, except the tables between `<!-- table:NAME -->` and
`<!-- /table -->` markers: `tables(results)` makes every table the results allow (named
`<results file>/<table>`, for example `compare_cpu/training`) and `render` fills them in.

  python -m benchmarks.render      # refill BENCHMARKS.md's tables from the saved results

runs nothing; `python -m benchmarks.run` measures, saves the results and then renders. The
targets the `targets` table reports met or missed are in benchmarks/targets.json.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics

from tools import markdown

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ROOT / "benchmarks" / "targets.json"
OUT = ROOT / "BENCHMARKS.md"


def load_results(folder: pathlib.Path = RESULTS) -> dict[str, dict]:
  """{file stem: results} of every benchmarks/results/*.json."""
  return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def _f(x: float, digits: int = 2) -> str:
  return f"{x:,.{digits}f}"


def _mb(x: float) -> str:
  return f"{x:,.0f} MB"


def _load(values) -> str:
  return " / ".join(f"{v:.2f}" for v in values)


def machine_line(meta: dict) -> str:
  m = meta["machine"]
  v = m["versions"]
  versions = ", ".join(f"{k} {v[k]}" for k in v)
  gpu = f"; GPU: {m['gpu']}" if m.get("gpu") else ""
  return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB memory{gpu} "
          f"({m['platform']}); {versions}")


# ---------------------------------------------------------------------------------------------
# The comparison.


def derived(res: dict) -> dict:
  """Ratios, FLOP/s and fractions of peak from one comparison's raw results."""
  spec, train = res["spec"], res["train"]
  b = spec["batch"]
  n = spec["matmul_size"]
  peak = {s: 2.0 * n**3 / train[f"matmul_{s}"]["median"] for s in ("jax", "torch")}
  flops = res["jax_setup"]["flops"]
  flops_full = res["jax_full_setup"]["flops"]
  d = {
      "clips_per_s": {s: b / train[s]["median"] for s in ("jax", "torch", "jax_full")},
      "speedup": train["torch"]["median"] / train["jax"]["median"],
      "overhead": train["jax_full"]["median"] / train["jax"]["median"] - 1.0,
      "peak": peak,
      "flops": {"jax": flops, "jax_full": flops_full},
      "achieved": {"jax": flops / train["jax"]["median"],
                   "jax_full": flops_full / train["jax_full"]["median"],
                   "torch": flops / train["torch"]["median"]},
  }
  d["fraction"] = {s: d["achieved"][s] / peak["jax"] for s in ("jax", "jax_full", "torch")}
  d["rounds"] = rounds(res)
  # The targets are read per interleaved round (neighbours in time share the machine's state),
  # over the quiet rounds (render.quiet); without round data, from the medians above.
  r = d["rounds"]
  if r:
    use = [i for i, q in enumerate(r["quiet"]) if q] or list(range(len(r["quiet"])))
    d["target"] = {k: statistics.median(r[k][i] for i in use)
                   for k in ("speedup", "overhead", "fraction")}
    d["target_rounds"] = (len(use), len(r["quiet"]))
    d["step"] = {k: statistics.median(r[k][i] for i in use) for k in ("jax", "torch", "jax_full")}
    d["profile_peak"] = 2.0 * n**3 / statistics.median(r["matmul_jax"][i] for i in use)
  else:
    d["step"] = {k: train[k]["median"] for k in ("jax", "torch", "jax_full")}
    d["profile_peak"] = peak["jax"]
    d["target"] = {"speedup": d["speedup"], "overhead": d["overhead"],
                   "fraction": d["fraction"]["jax"]}
  return d


# A round is "shared" when other processes used more than this share of the machine's cores
# during it (/proc accounting, compare.OthersMeter); results without that accounting fall back
# on the probe matmuls (a JAX one before the round, a PyTorch one after it) running more than
# BUSY_FACTOR slower than the run's fastest.
QUIET_OTHERS = 0.10
BUSY_FACTOR = 1.25


def _fastest(res: dict) -> tuple[float, float]:
  tt, probes = res.get("train_times", {}), res.get("probes", {})
  jax_mm = list(tt.get("matmul_jax", [])) + [a for ph in probes.values() for a, _ in ph]
  torch_mm = list(tt.get("matmul_torch", [])) + [b for ph in probes.values() for _, b in ph]
  return min(jax_mm), min(torch_mm)


def quiet(res: dict, phase: str, jax_mm: list[float], torch_mm: list[float]) -> list[bool]:
  others = res.get("others_share", {}).get(phase)
  if others and len(others) == len(jax_mm):
    return [x <= QUIET_OTHERS for x in others]
  bj, bt = _fastest(res)
  return [a <= BUSY_FACTOR * bj and b <= BUSY_FACTOR * bt
          for a, b in zip(jax_mm, torch_mm, strict=True)]


def rounds(res: dict) -> dict | None:
  """Per interleaved round: each system's median step and the ratios within the round."""
  tt, plan, spec = res.get("train_times"), res["plan"], res["spec"]
  if not tt:
    return None
  k, mk = plan["train_steps"], plan["matmul_reps"]
  n = len(tt["jax"]) // k

  def per_round(key, size):
    return [statistics.median(tt[key][i * size:(i + 1) * size]) for i in range(n)]

  j, t, f = per_round("jax", k), per_round("torch", k), per_round("jax_full", k)
  mm, mt = per_round("matmul_jax", mk), per_round("matmul_torch", mk)
  flops, mm_flops = res["jax_setup"]["flops"], 2.0 * spec["matmul_size"] ** 3
  bj, bt = _fastest(res)
  return {"jax": j, "torch": t, "jax_full": f, "matmul_jax": mm, "matmul_torch": mt,
          "slow": [(a / bj, b / bt) for a, b in zip(mm, mt, strict=True)],
          "quiet": quiet(res, "train", mm, mt),
          "others": res.get("others_share", {}).get("train"),
          "speedup": [b / a for a, b in zip(j, t, strict=True)],
          "overhead": [c / a - 1 for a, c in zip(j, f, strict=True)],
          "fraction": [(flops / a) / (mm_flops / m) for a, m in zip(j, mm, strict=True)]}


def _phase_rounds(res: dict, kind: str, key: str) -> list[tuple[float, float]] | None:
  """(hade_jax, PyTorch) median time per round of the embed/part phase, quiet rounds only."""
  times = res.get(f"{kind}_times")
  if not times or f"jax_{key}" not in times:
    return None
  reps = res["plan"]["part_reps" if kind == "part" else "embed_reps"]
  j, t = times[f"jax_{key}"], times[f"torch_{key}"]
  n = min(len(j), len(t)) // reps
  pairs = [(statistics.median(j[i * reps:(i + 1) * reps]),
            statistics.median(t[i * reps:(i + 1) * reps])) for i in range(n)]
  probes = res.get("probes", {}).get(kind)
  if probes and len(probes) == n:
    flags = quiet(res, kind, [a for a, _ in probes], [b for _, b in probes])
    pairs = [p for p, q in zip(pairs, flags, strict=True) if q] or pairs
  return pairs or None


def paired_ratio(res: dict, kind: str, key: str) -> float | None:
  """Median over (quiet) interleaved rounds of PyTorch's time over hade_jax's in the round."""
  pairs = _phase_rounds(res, kind, key)
  return statistics.median(t / j for j, t in pairs) if pairs else None


def phase_time(res: dict, kind: str, key: str, system: str) -> float:
  """Median time over the (quiet) rounds; the all-round median without round data."""
  pairs = _phase_rounds(res, kind, key)
  if pairs:
    return statistics.median(p[0 if system == "jax" else 1] for p in pairs)
  return res["parts" if kind == "part" else "embed"][f"{system}_{key}"]["median"]


def _range(s: dict, scale: float = 1.0, digits: int = 2) -> str:
  return (f"{_f(s['median'] * scale, digits)} ({_f(s['min'] * scale, digits)}–"
          f"{_f(s['max'] * scale, digits)})")


def _rate_range(b: int, s: dict) -> str:
  return f"{_f(b / s['median'], 2)} ({_f(b / s['max'], 2)}–{_f(b / s['min'], 2)})"


def _xla_temp(res: dict, key: str) -> str:
  setup = {"jax": res["jax_setup"], "jax_full": res["jax_full_setup"]}.get(key)
  if setup and "xla_temp_mb" in setup:
    return f" (XLA temporaries {_mb(setup['xla_temp_mb'])})"
  return ""


PARTS = (("audio", "audio tower: front end + HTS-AT + projection (forward + backward)"),
         ("text", "text tower: RoBERTa + pooler + projection (forward + backward)"),
         ("optimizer", "optimizer: global-norm clip + AdamW update"))


def profile_rows(res: dict, d: dict) -> list[dict]:
  """Per part of the step: both systems' times, XLA FLOPs, JAX FLOP/s and share of the step."""
  parts, pf = res["parts"], res.get("part_flops", {})
  ef = res.get("embed_flops") or {}
  rows = []
  def t(kind, key, system):
    return phase_time(res, kind, key, system)

  for key, label in PARTS:
    rows.append({"key": key, "label": label, "jax": t("part", key, "jax"),
                 "torch": t("part", key, "torch"), "flops": pf.get(key, float("nan"))})
    if key in ("audio", "text"):
      rows.append({"key": f"{key}_fwd", "label": "&nbsp;&nbsp;of which the forward (eval mode"
                   + (", from the log-mel)" if key == "audio" else ")"),
                   "jax": t("embed", key, "jax"), "torch": t("embed", key, "torch"),
                   "flops": ef.get(key, float("nan")), "sub": True})
    if key == "audio" and "jax_attention" in parts:
      rows.append({"key": "attention", "label": "&nbsp;&nbsp;of which the window-attention core "
                   "(scores, bias, softmax, values; forward + backward, every block)",
                   "jax": t("part", "attention", "jax"), "torch": t("part", "attention", "torch"),
                   "flops": pf.get("attention", float("nan")), "sub": True})
    rng = res["spec"].get("dropout_rng", "threefry2x32")
    if key == "text" and "jax_dropout" in parts:
      rows.append({"key": "dropout", "label": "&nbsp;&nbsp;the two towers' dropout masks "
                   f"({res.get('dropout_elements', 0) / 1e6:.0f} M random draws per step, "
                   f"{rng}, inside the tower rows above)", "jax": t("part", "dropout", "jax"),
                   "torch": t("part", "dropout", "torch"),
                   "flops": pf.get("dropout", float("nan")), "sub": True})
    if key == "text" and "jax_dropout_rbg" in parts and rng != "rbg":
      rows.append({"key": "dropout_rbg", "label": "&nbsp;&nbsp;the same masks drawn with "
                   "`config.dropout_rng='rbg'` (not in the step)",
                   "jax": t("part", "dropout_rbg", "jax"),
                   "torch": t("part", "dropout_rbg", "torch"), "flops": float("nan"),
                   "sub": True})
  step_j, step_t = d["step"]["jax"], d["step"]["torch"]
  main = [r for r in rows if not r.get("sub")]
  rows.append({"key": "rest", "label": "rest, not in the parts: heads, loss, metrics, the "
               "step's own glue (the step minus the three parts)",
               "jax": step_j - sum(r["jax"] for r in main),
               "torch": step_t - sum(r["torch"] for r in main),
               "flops": d["flops"]["jax"] - sum(r["flops"] for r in main)})
  rows.append({"key": "step", "label": "**whole training step**", "jax": step_j,
               "torch": step_t, "flops": d["flops"]["jax"]})
  for r in rows:
    ok = r["jax"] > 0
    r["gflops"] = r["flops"] / r["jax"] / 1e9 if ok else float("nan")
    r["fraction"] = r["flops"] / r["jax"] / d["profile_peak"] if ok else float("nan")
    r["share"] = r["jax"] / step_j
    r["ratio"] = r["torch"] / r["jax"] if ok else float("nan")
    # Where the raw times are kept, the ratio is read per interleaved round (as the targets).
    kind, key = ("embed", r["key"][:-4]) if r["key"].endswith("_fwd") else ("part", r["key"])
    paired = paired_ratio(res, kind, key)
    if paired is not None:
      r["ratio"] = paired
  by = {r["key"]: r for r in rows}
  by["step"]["ratio"] = d["target"]["speedup"]
  return rows


def by_key(rows: list[dict]) -> dict:
  return {r["key"]: r for r in rows}


# compare.Spec fields a run may change, with the value they have when the results omit them.
SETTINGS = (("compute_dtype", ""), ("dropout_rng", "threefry2x32"), ("jax_xla_flags", ""),
            ("keep_freed_memory", True))
# What a run saved before a setting existed ran with (glibc's default malloc).
SETTINGS_BEFORE = {"keep_freed_memory": False}


def settings(res: dict) -> list[str]:
  """The run's Spec settings that differ from their defaults, as `field=value`."""
  spec = res["spec"]
  values = {k: spec.get(k, SETTINGS_BEFORE.get(k, default)) for k, default in SETTINGS}
  return [f"{k}={values[k]}" for k, default in SETTINGS if values[k] != default]


def run_table(res: dict) -> str:
  """When, how and on what a comparison ran."""
  notes = (["quick sizes"] if res["quick"] else []) + settings(res)
  return markdown.table(
      ("command", "date", "minutes", "machine", "load averages (1, 5, 15 min) before",
       "after"),
      [(f"`{res['command']}`" + (f" ({'; '.join(notes)})" if notes else ""), res["date"],
        f"{res['wall_s'] / 60:.1f}", machine_line(res), _load(res["load_before"]),
        _load(res["load_after"]))])


def _dtype(res: dict) -> str:
  spec = res["spec"]
  return spec.get("compute_dtype") or ("bfloat16" if spec.get("device") == "gpu" else "float32")


def _memory(res: dict, key: str) -> str:
  """A worker's peak device memory (accelerators), else its peak RSS, with XLA's temporaries."""
  mem = res["memory"][key]
  if "peak_device_mb" not in mem:
    return f"{_mb(mem['peak_rss_mb'])}{_xla_temp(res, key)}"
  temp = _xla_temp(res, key)[2:-1]
  return f"{_mb(mem['peak_device_mb'])} (host RSS {_mb(mem['peak_rss_mb'])}" + \
      (f"; {temp})" if temp else ")")


def training_table(res: dict, d: dict) -> str:
  spec, train, mem = res["spec"], res["train"], res["memory"]
  b = spec["batch"]
  device = any("peak_device_mb" in m for m in mem.values())
  fraction = ("MFU: fraction of the JAX " + _dtype(res) + " matmul peak" if device
              else "fraction of JAX matmul peak")
  memory = "peak device memory" if device else "peak RSS"
  out = ["| system | step time, s: median (min–max) | clips/s: median (min–max) | "
         "hade_jax / PyTorch (clips/s) | FLOPs per step (XLA) | achieved GFLOP/s | "
         f"{fraction} | {memory} |\n|---|---|---|---|---|---|---|---|\n"]
  rows = (("hade_jax, global (CLAP-equivalent)", "jax", d["speedup"]),
          ("PyTorch `ClapModel` (reference)", "torch", 1.0),
          ("hade_jax, full HADE (THA + DCR + CA)", "jax_full",
           train["torch"]["median"] / train["jax_full"]["median"]))
  for label, key, ratio in rows:
    flops = d["flops"].get(key, d["flops"]["jax"])
    note = "" if key != "torch" else " ¹"
    out.append(f"| {label} | {_range(train[key])} | {_rate_range(b, train[key])} | "
               f"{ratio:.2f}x | {flops / 1e12:.2f} T{note} | {d['achieved'][key] / 1e9:,.0f}"
               f"{note} | {100 * d['fraction'][key]:.0f} %{note} | "
               f"{_memory(res, key)} |\n")
  return "".join(out)


def rounds_table(d: dict) -> str:
  """Per interleaved round: times, the machine's state and the ratios."""
  r = d["rounds"]
  lines = ["| round | hade_jax s | PyTorch s | full HADE s | others' share of the cores | "
           "probe matmuls vs the run's fastest (JAX / PyTorch) | hade_jax / PyTorch | "
           "full HADE extra | fraction of peak |\n|---|---|---|---|---|---|---|---|---|\n"]
  for i in range(len(r["jax"])):
    a, b = r["slow"][i]
    state = "quiet" if r["quiet"][i] else "**shared**"
    others = f"{100 * r['others'][i]:.0f} %, {state}" if r["others"] else state
    lines.append(f"| {i + 1} | {r['jax'][i]:.2f} | {r['torch'][i]:.2f} | {r['jax_full'][i]:.2f} | "
                 f"{others} | {a:.2f}x / {b:.2f}x | {r['speedup'][i]:.2f}x | "
                 f"{100 * r['overhead'][i]:+.1f} % | {100 * r['fraction'][i]:.0f} % |\n")
  m = d["target"]
  label = "median, quiet rounds" if any(r["quiet"]) else "median, all rounds"
  lines.append(f"| **{label}** | | | | | | **{m['speedup']:.2f}x** | "
               f"**{100 * m['overhead']:+.1f} %** | **{100 * m['fraction']:.0f} %** |\n")
  return "".join(lines)


def measurements_table(res: dict, d: dict) -> str:
  """The comparison's single measurements that no other table holds."""
  counted = res["torch_warmup"].get("counted_flops")
  ps, c = res["peak_setup"], res["check"]
  rows = [("rounds used for the targets (quiet / all)",
           "{} / {}".format(*d["target_rounds"]) if d["rounds"] else "no round data"),
          ("full HADE extra time per step: median of the per-round values",
           f"{100 * d['target']['overhead']:+.1f} %"),
          ("full HADE extra time per step: from the overall medians",
           f"{100 * d['overhead']:+.1f} %"),
          ("full HADE extra FLOPs per step (XLA)",
           f"{d['flops']['jax_full'] / d['flops']['jax'] - 1:+.2%}"),
          ("last training loss: hade_jax / reference / full HADE",
           f"{res['loss']['jax']:.3f} / {res['loss']['torch']:.3f} / "
           f"{res['loss']['jax_full']:.3f}")]
  if counted:
    rows.append(("PyTorch `FlopCounterMode` per step (matmuls and convolutions only)",
                 f"{counted / 1e12:.2f} TFLOP, {100 * counted / d['flops']['jax']:.0f} % of "
                 "XLA's count"))
  mf = res.get("minor_faults_per_step")
  if mf:
    rows.append(("minor page faults per training step (`ru_minflt`, 4 KiB pages): hade_jax / "
                 "PyTorch / full HADE",
                 f"{mf['jax']:,.0f} ({mf['jax'] * 4096 / 2**30:.1f} GiB) / {mf['torch']:,.0f} "
                 f"({mf['torch'] * 4096 / 2**30:.1f} GiB) / {mf['jax_full']:,.0f}"))
  rows += [("log-mel front ends (hade_jax `log_mel` vs `torch.stft`): max abs diff",
            f"{c['log_mel_max_abs_diff_db']:.1e} dB"),
           ("embedding check tolerance (unit vectors)", f"{c['tolerance']:g}"),
           ("peak matmul: XLA's cost analysis (analytic 2n³)",
            f"{ps['flops'] / 1e9:.1f} GFLOP ({ps['analytic_flops'] / 1e9:.1f})")]
  return markdown.table(("measurement", "value"), rows)


def embed_table(res: dict) -> str:
  spec, e, c = res["spec"], res["embed"], res["check"]
  b = spec["batch"]
  lines = ["| tower | hade_jax items/s: median (min–max) | PyTorch items/s | "
           "hade_jax / PyTorch (per round) | GFLOP per item (XLA) | "
           "max abs diff of the embeddings |\n"
           "|---|---|---|---|---|---|\n"]
  flops = res.get("embed_flops") or {}
  for what, label in (("audio", f"audio ({spec['seconds']:g} s clips)"),
                      ("text", f"text ({spec['text_len']} tokens)")):
    j, t = e[f"jax_{what}"], e[f"torch_{what}"]
    gf = flops.get(what, float("nan")) / b / 1e9
    ratio = paired_ratio(res, "embed", what) or t["median"] / j["median"]
    cos = (f" (least cosine {c[f'{what}_min_cosine']:.4f})"
           if _dtype(res) == "bfloat16" and f"{what}_min_cosine" in c else "")
    lines.append(f"| {label} | {_rate_range(b, j)} | {_rate_range(b, t)} | "
                 f"{ratio:.2f}x | {gf:.1f} | {c[f'{what}_max_abs_diff']:.1e}{cos} |\n")
  return "".join(lines)


def peak_table(res: dict) -> str:
  n, train = res["spec"]["matmul_size"], res["train"]
  lines = ["| matmul | GFLOP/s: median (min–max) |\n|---|---|\n"]
  for s, label in (("jax", "JAX (XLA)"), ("torch", "PyTorch")):
    t = train[f"matmul_{s}"]
    lines.append(f"| {label} | {_f(2 * n**3 / t['median'] / 1e9, 0)} "
                 f"({_f(2 * n**3 / t['max'] / 1e9, 0)}–{_f(2 * n**3 / t['min'] / 1e9, 0)}) |\n")
  return "".join(lines)


def targets_table(d: dict, targets: list[dict], machine: str = "",
                  sources: dict[str, tuple[dict, str]] | None = None) -> str:
  """Each target of benchmarks/targets.json: measured, met or missed, and by how much.

  A target with a "source" (a results file) reads its value from `sources[source]`, a
  ({measure: value}, machine) pair; the others from the comparison (`d`, on `machine`).
  A target whose source has no results yet is listed as not measured.
  """
  formats = {"x": lambda x: f"{x:.2f}x", "%": lambda x: f"{100 * x:.1f} %",
             "ms": lambda x: f"{x:,.1f} ms", "s": lambda x: f"{x:,.1f} s",
             "min": lambda x: f"{x:,.1f} min"}
  sources = sources or {}
  lines = ["| target | measured | target | status | margin | machine |\n"
           "|---|---|---|---|---|---|\n"]
  for t in targets:
    target, fmt = t["target"], formats[t["unit"]]
    if t.get("source") and t["source"] not in sources:
      lines.append(f"| {t['name']} | not measured (no `{t['source']}` results) | "
                   f"{fmt(target)} | - | - | - |\n")
      continue
    values, where = sources[t["source"]] if t.get("source") else (d["target"], machine)
    if t["measure"] not in values:  # its benchmark ran, but not at the size the target needs
      lines.append(f"| {t['name']} | not measured | {fmt(target)} | - | - | {where} |\n")
      continue
    value = values[t["measure"]]
    if not math.isfinite(value):  # measured, but no point meets the target's condition
      lines.append(f"| {t['name']} | no measured point qualifies | {fmt(target)} | missed | - | "
                   f"{where} |\n")
      continue
    higher = t["higher_is_better"]
    met = value >= target if higher else value <= target
    if higher:
      margin = f"{value / target:.2f}x the target" if met else \
          f"missed by {100 * (1 - value / target):.0f} % ({fmt(target - value)} short)"
    else:
      margin = f"{fmt(target - value)} to spare" if met else f"missed by {fmt(value - target)}"
    lines.append(f"| {t['name']} | {fmt(value)} | {fmt(target)} | "
                 f"{'met' if met else 'missed'} | {margin} | {where} |\n")
  return "".join(lines)


def profile_table(res: dict, d: dict) -> str:
  lines = ["| part | hade_jax s | PyTorch s | hade_jax / PyTorch (speed, per round) | share of the "
           "hade_jax step | GFLOP (XLA) | hade_jax GFLOP/s | fraction of peak |\n"
           "|---|---|---|---|---|---|---|---|\n"]
  for r in profile_rows(res, d):
    no_flops = r["key"].startswith("dropout") or not math.isfinite(r["gflops"])
    flop_cells = ("- | - | -" if no_flops else
                  f"{r['flops'] / 1e9:,.1f} | {r['gflops']:,.0f} | {100 * r['fraction']:.0f} %")
    ratio = f"{r['ratio']:.2f}x" if math.isfinite(r["ratio"]) and r["ratio"] > 0 else "-"
    lines.append(f"| {r['label']} | {r['jax']:.3f} | {r['torch']:.3f} | {ratio} | "
                 f"{100 * r['share']:.0f} % | {flop_cells} |\n")
  return "".join(lines)


def compare_tables(res: dict, targets: list[dict],
                   sources: dict[str, tuple[dict, str]] | None = None) -> dict[str, str]:
  d = derived(res)
  m = res["machine"]
  machine = f"{m['cpu']}, {m['cores']} cores"
  out = {"run": run_table(res), "training": training_table(res, d),
         "measurements": measurements_table(res, d), "embedding": embed_table(res),
         "peak": peak_table(res), "targets": targets_table(d, targets, machine, sources),
         "profile": profile_table(res, d)}
  if d["rounds"]:
    out["rounds"] = rounds_table(d)
  return out


# ---------------------------------------------------------------------------------------------
# Data pipeline, evaluation and search.


def pipeline_table(res: dict) -> str:
  """One row per recorded run of benchmarks/input_pipeline.py: clips/s per worker count."""
  runs = res.get("runs", [])
  workers = sorted({w["workers"] for r in runs for w in r["rows"]})
  lines = ["| date | dataset (records) | batches timed | load avg before -> after | "
           + " | ".join(f"{w} worker{'s' if w != 1 else ''}" for w in workers)
           + " |\n|" + "---|" * (4 + len(workers)) + "\n"]
  for r in runs:
    by = {w["workers"]: w for w in r["rows"]}
    load = (f"{r['load_before']:.1f} -> {r['load_after']:.1f}" if r.get("load_before")
            is not None else r.get("load_note", "not recorded"))
    cells = " | ".join(f"{by[w]['clips_per_s']:,.0f} clips/s" if w in by else "-"
                       for w in workers)
    lines.append(f"| {r['date'][:10]} | {r['label']} | {r.get('batches', '-')} | {load} | "
                 f"{cells} |\n")
  return "".join(lines)


def preparation_table(res: dict) -> str:
  """Preparation times recorded with the pipeline results."""
  return markdown.table(("what", "time"), [(p["what"], p["time"]) for p in res["preparation"]])


def eval_run_table(res: dict) -> str:
  meta = res.get("meta", {})
  return markdown.table(
      ("date", "sizes", "machine", "1-min load average at the start", "at the end"),
      [(meta.get("date", "")[:10] or "(date not recorded)",
        "quick" if res.get("quick") else "full", res["machine"], f"{res['load_before']:.1f}",
        f"{res.get('load_after', float('nan')):.1f}")])


def score_table(res: dict) -> str:
  lines = ["| tile | compile + first tile (s) | scoring (s) | pairs/s | RSS before (MB) | "
           "peak RSS (MB) |\n|---|---|---|---|---|---|\n"]
  for r in res["score"]:
    lines.append(f"| {r['tile']} | {r['compile_s']:.1f} | {r['score_s']:.1f} | "
                 f"{r['pairs_per_s']:,.0f} | {r['rss_before_mb']:,.0f} | "
                 f"{r['peak_rss_mb']:,.0f} |\n")
  return "".join(lines)


def search_table(res: dict) -> str:
  search = res["search"]
  shortlists = sorted({int(s) for r in search for s in r["two_stage"]})
  lo, hi = shortlists[0], shortlists[-1]
  lines = [f"| clips | two-stage, S={lo:,} | two-stage, S={hi:,} | exhaustive, per query | "
           f"exhaustive top 10 kept by two-stage, S={lo:,} / S={hi:,} | target R@1 / R@10 "
           "(exhaustive) | recall queries | peak RSS |\n|---|---|---|---|---|---|---|---|\n"]
  for r in search:
    ts = {int(s): v for s, v in r["two_stage"].items()}
    ex = r["exhaustive_ms_per_query"]
    ex_s = f"{ex:,.0f} ms" if ex < 1000 else f"{ex / 1000:,.1f} s"
    hi_s = f"{ts[hi]['median_ms']:,.0f} ms" + (" (S = corpus)" if hi >= r["clips"] else "")
    lines.append(f"| {r['clips']:,} | {ts[lo]['median_ms']:,.0f} ms | {hi_s} | {ex_s} | "
                 f"{ts[lo]['top10_kept']:.1f} % / {ts[hi]['top10_kept']:.0f} % | "
                 f"{r['exhaustive_target']['R@1']:.0f} % / "
                 f"{r['exhaustive_target']['R@10']:.0f} % | {r['recall_queries']} | "
                 f"{r['peak_rss_mb'] / 1024:.1f} GB |\n")
  return "".join(lines)


def recall_table(rec: dict) -> str:
  m = rec["metrics"]
  sizes = sorted({int(k.split("/")[0].split("@")[1]) for k in m if k.startswith("two_stage@")},
                 reverse=True)
  keys = ("R@1", "R@5", "R@10", "mAP@10")
  lines = ["| shortlist | T2A " + " | ".join(keys) + " |\n|---|---|---|---|---|\n"]
  lines.append(f"| exhaustive ({rec['num_clips']}) | "
               + " | ".join(f"{m[f't2a/{k}']:.2f}" for k in keys) + " |\n")
  for s in sizes:
    if s >= rec["num_clips"]:
      continue
    lines.append(f"| {s} | " + " | ".join(
        f"{m[f'two_stage@{s}/t2a/{k}']:.2f} (-{m[f'two_stage@{s}/t2a/{k}/lost']:.2f})"
        for k in keys) + " |\n")
  return "".join(lines)


# ---------------------------------------------------------------------------------------------


def tables(results: dict[str, dict], targets: list[dict] | None = None) -> dict[str, str]:
  """Every table the results allow, named `<results file>/<table>`."""
  targets = json.loads(TARGETS.read_text()) if targets is None else targets
  out = {}
  sources = {}  # targets measured by other benchmarks: ({measure: value}, machine)
  if "ann_search" in results:
    from benchmarks import ann_search  # the benchmark owns its tables

    res = results["ann_search"]
    sources["ann_search"] = (ann_search.target_values(res), ann_search.target_machine(res))
    out |= ann_search.tables(res)
  if "pair_score" in results:
    from benchmarks import pair_score  # the benchmark owns its tables

    res = results["pair_score"]
    sources["pair_score"] = (pair_score.target_values(res), res["machine"])
    out |= {"pair_score/run": pair_score.run_table(res),
            "pair_score/scoring": pair_score.table(res)}
  if "compare_gpu" in results:
    res = results["compare_gpu"]
    sources["compare_gpu"] = ({"wall_min": res["wall_s"] / 60},
                              res["machine"].get("gpu") or f"{res['machine']['cpu']} + a GPU")
  for name in ("compare_cpu", "compare_gpu"):
    if name in results:
      out |= {f"{name}/{k}": v
              for k, v in compare_tables(results[name], targets, sources).items()}
  if "input_pipeline" in results:
    out["input_pipeline/runs"] = pipeline_table(results["input_pipeline"])
    if results["input_pipeline"].get("preparation"):
      out["input_pipeline/preparation"] = preparation_table(results["input_pipeline"])
  evals = results.get("eval_search") or results.get("eval_search_quick")
  if evals:
    out |= {"eval_search/run": eval_run_table(evals), "eval_search/scoring": score_table(evals),
            "eval_search/search": search_table(evals)}
  if "real_recall" in results:
    out["real_recall/recall"] = recall_table(results["real_recall"])
  if "serve_load" in results:
    from benchmarks import serve_load  # the load test owns its table

    out["serve_load/latency"] = serve_load.table(results["serve_load"])
  return out


GPU_HEADING = "## hade_jax against the PyTorch reference, GPU"
GPU_TABLES = ("run", "training", "rounds", "measurements", "embedding", "peak", "profile")


def add_gpu_markers(text: str) -> str:
  """`text` with empty markers for the compare_gpu tables at the end of the GPU section, when it
  has none yet (the first GPU run): the tables then fill in; the prose is left to be written."""
  if "<!-- table:compare_gpu/" in text or GPU_HEADING not in text:
    return text
  start = text.index(GPU_HEADING)
  end = text.find("\n## ", start + len(GPU_HEADING))
  end = len(text) if end < 0 else end + 1
  block = "".join(f"<!-- table:compare_gpu/{name} -->\n<!-- /table -->\n\n"
                  for name in GPU_TABLES)
  return text[:end].rstrip("\n") + "\n\n" + block + text[end:]


def render(results: dict[str, dict], text: str | None = None, source: str = str(OUT)) -> str:
  """`text` (default: BENCHMARKS.md as it is) with its marked tables made from `results`."""
  text = pathlib.Path(source).read_text() if text is None else text
  return markdown.fill(text, tables(results), source)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Refill BENCHMARKS.md's tables from "
                                   "benchmarks/results/*.json (runs nothing).")
  parser.add_argument("--out", default=str(OUT), help="the hand-written markdown to fill")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.write_text(render(load_results(), out.read_text(), str(out)))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
