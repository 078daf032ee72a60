"""The benchmark's measurement functions at tiny sizes (no timing assertions).

hade_jax and the PyTorch reference (HF ClapModel) built from the same saved weights must embed
alike; XLA's cost analysis must count a plain matmul's FLOPs; BENCHMARKS.md's renderer must
produce the comparison tables with their ratio columns from results shaped as
`benchmarks.compare.run` returns them.
"""

import numpy as np
import pytest

from benchmarks import compare, render
from benchmarks import run as bench_run


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
  spec = compare.tiny_spec()
  folder = str(tmp_path_factory.mktemp("clap") / "clap")
  torch_system = compare.TorchSystem(spec, folder)
  torch_setup = torch_system.setup()
  jax_system = compare.JaxSystem(spec, folder, "global")
  jax_setup = jax_system.setup(embed=True, train=False)
  return spec, torch_system, torch_setup, jax_system, jax_setup


def test_embeddings_agree(systems):
  spec, torch_system, torch_setup, jax_system, _ = systems
  mel = torch_system.log_mel()
  np.testing.assert_allclose(jax_system.log_mel(), mel, atol=1e-3, rtol=0)  # dB
  ja, jt = jax_system.embeddings(mel)
  ta, tt = torch_system.reference_embeddings()
  assert ja.shape == ta.shape == (spec.batch, spec.projection_dim)
  assert jt.shape == tt.shape == (spec.batch, spec.projection_dim)
  np.testing.assert_allclose(np.linalg.norm(ja, axis=-1), 1.0, atol=1e-5)
  assert np.abs(ja - ta).max() < spec.tolerance
  assert np.abs(jt - tt).max() < spec.tolerance
  # Same parameters but CLAP's second temperature (logit_scale_a), which HADE does not have.
  assert torch_setup["params"] - jax_system_params(jax_system) == 1


def jax_system_params(jax_system):
  import jax

  return sum(x.size for x in jax.tree.leaves(jax_system.state.params))


def test_embedding_calls_and_flops(systems):
  _, torch_system, _, jax_system, _ = systems
  for what in ("audio", "text"):
    assert len(jax_system.embed(what, 2)["times"]) == 2
    assert len(torch_system.embed(what, 1)["times"]) == 1
    assert jax_system.embed_flops[what] > 0


def test_cost_analysis_counts_a_matmul():
  spec = compare.tiny_spec(matmul_size=128)
  peak = compare.PeakSystem(spec)
  out = peak.setup()
  analytic = 2 * 128**3
  assert out["analytic_flops"] == analytic
  assert analytic / 2 <= out["flops"] <= 2 * analytic
  assert len(peak.run("jax", 2)["times"]) == 2
  assert len(peak.run("torch", 1)["times"]) == 1


def test_attention_blocks_follow_the_geometry():
  spec = compare.tiny_spec()
  # 128 x 128 image, 4x4 patches -> 32 x 32 tokens; window 4; depths 1-1-2-1; width 16.
  assert compare.attention_blocks(spec) == [(64, 2, 16, 8), (16, 2, 16, 16), (4, 4, 16, 16),
                                            (4, 4, 16, 16), (1, 4, 16, 32)]
  assert compare.attention_flops(spec) > 0
  # Swin MLP outputs (16 channels x 32 x 32 tokens, ...) and RoBERTa's four dropout sites.
  swin = 2 * (32 * 32 * 16 + 16 * 16 * 32 + 2 * 8 * 8 * 64 + 4 * 4 * 128)
  text = 2 * 12 * 32 * (1 + 2 * 3) + 2 * 2 * 12 * 12 * 3
  assert compare.dropout_elements(spec) == swin + text


def fake_results(spec: compare.Spec) -> dict:
  """A results dict shaped as compare.run returns it (values plausible, not measured)."""
  plan = compare.Plan()

  def s(m):
    return {"median": m, "min": 0.9 * m, "max": 1.2 * m, "n": 4}

  parts = {"jax_audio": s(1.0), "torch_audio": s(1.3), "jax_attention": s(0.3),
           "torch_attention": s(0.2), "jax_text": s(0.5), "torch_text": s(0.6),
           "jax_optimizer": s(0.2), "torch_optimizer": s(0.1), "jax_dropout": s(0.3),
           "torch_dropout": s(0.05)}
  versions = {k: "1.0" for k in ("python", *bench_run.PACKAGES)}
  return {
      "spec": compare.dataclasses.asdict(spec), "plan": compare.dataclasses.asdict(plan),
      "date": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.run --quick",
      "quick": True, "device": "cpu", "wall_s": 300.0, "load_before": [1.0, 1.0, 1.0],
      "load_after": [1.2, 1.1, 1.0],
      "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 24.0, "platform": "Linux",
                  "versions": versions},
      "torch_setup": {"params": 101, "adamw": "fused", "threads": 2, "interop_threads": 2,
                      "attention": {"audio": "eager", "text": "sdpa"}},
      "jax_setup": {"params": 100, "flops": 4e11, "xla_temp_mb": 100.0},
      "jax_full_setup": {"params": 110, "flops": 4.1e11, "xla_temp_mb": 110.0},
      "torch_warmup": {"counted_flops": 3.9e11},
      "peak_setup": {"flops": 2.0 * spec.matmul_size**3,
                     "analytic_flops": 2.0 * spec.matmul_size**3},
      "check": {"audio_max_abs_diff": 1e-7, "text_max_abs_diff": 2e-7,
                "log_mel_max_abs_diff_db": 1e-5, "tolerance": spec.tolerance},
      "embed": {"jax_audio": s(0.5), "torch_audio": s(0.6), "jax_text": s(0.1),
                "torch_text": s(0.1)},
      "embed_flops": {"audio": 1e11, "text": 4e10},
      "train": {"jax": s(2.0), "torch": s(2.5), "jax_full": s(2.1), "matmul_jax": s(0.4),
                "matmul_torch": s(0.35)},
      "train_times": {"jax": [2.0, 1.8, 2.4, 2.0], "torch": [2.5, 2.25, 3.0, 2.5],
                      "jax_full": [2.1, 1.89, 2.52, 2.1], "matmul_jax": [0.4] * 12,
                      "matmul_torch": [0.35] * 12},
      "loss": {"jax": 2.0, "torch": 2.0, "jax_full": 5.0},
      "memory": {k: {"peak_rss_mb": 1000.0} for k in ("jax", "jax_full", "torch", "peak")},
      "parts": parts, "part_flops": {"audio": 2.8e11, "attention": 1e10, "text": 1.2e11,
                                     "optimizer": 3e9},
      "attention_matmul_flops": 1e10, "dropout_elements": 20_000_000,
      "minor_faults_per_step": {"jax": 7e5, "torch": 1e5, "jax_full": 7e5},
  }


def test_markdown_has_the_ratio_columns():
  spec = compare.full_spec()
  md = render.render(bench_run.load_results() | {"compare_cpu": fake_results(spec)})
  lines = md.splitlines()
  train_header = next(line for line in lines if line.startswith("| system | step time"))
  assert "hade_jax / PyTorch" in train_header and "fraction of JAX matmul peak" in train_header
  embed_header = next(line for line in lines if line.startswith("| tower |"))
  assert "hade_jax / PyTorch" in embed_header and "max abs diff" in embed_header
  row = next(line for line in lines if line.startswith("| hade_jax, global"))
  assert "1.25x" in row  # 2.5 s / 2.0 s
  assert any(line.startswith("| training clips/s, hade_jax over PyTorch") and "| met |" in line
             and "1.25x the target" in line for line in lines)  # parity is the target
  assert any(line.startswith("| full HADE step time") and "met" in line for line in lines)
  assert any(line.startswith("| **median, quiet rounds** |") and "**1.25x**" in line
             for line in lines)
  assert "Not measured: no GPU was lent to this task" in md
  for title in ("## Data pipeline", "## Evaluation and search", "### Profile"):
    assert title in md
  assert "nan" not in md.replace("nanodo", "")


def test_benchmarks_md_is_its_tables_filled_from_the_saved_results():
  # `python -m benchmarks.render` changes nothing: the committed tables are the JSON's.
  text = render.OUT.read_text()
  assert render.render(bench_run.load_results(), text) == text
  assert "<!-- table:compare_cpu/training -->" in text


def test_a_marker_without_results_names_the_file_and_the_table():
  text = "prose\n<!-- table:compare_gpu/training -->\n<!-- /table -->\n"
  with pytest.raises(KeyError, match=r"BENCHMARKS.md marks tables \['compare_gpu/training'\]"):
    render.render(bench_run.load_results(), text)


def test_gpu_results_fill_their_own_tables_with_mfu_and_device_memory():
  spec = compare.full_spec(device="gpu", batch=64, matmul_size=8192)
  res = fake_results(spec) | {"device": "gpu", "command": "python -m benchmarks.run "
                              "--device=gpu --quick"}
  res["memory"] = {k: {"peak_rss_mb": 3000.0, "peak_device_mb": 20_000.0}
                   for k in ("jax", "jax_full", "torch")} | {"peak": {"peak_rss_mb": 900.0}}
  res["check"] |= {"audio_min_cosine": 0.9991, "text_min_cosine": 0.9987}
  res["machine"] = res["machine"] | {"gpu": "Test GPU 141 GB"}
  res["wall_s"] = 360.0
  res["parts"] |= {"jax_dropout_rbg": {"median": 0.1, "min": 0.1, "max": 0.1, "n": 4},
                   "torch_dropout_rbg": {"median": 0.05, "min": 0.05, "max": 0.05, "n": 4}}
  text = render.add_gpu_markers(render.OUT.read_text())
  assert render.add_gpu_markers(text) == text  # markers are added once
  md = render.render(bench_run.load_results() | {"compare_gpu": res}, text)
  gpu = md[md.index(render.GPU_HEADING):md.index("## Data pipeline")]
  header = next(line for line in gpu.splitlines() if line.startswith("| system | step time"))
  assert "MFU: fraction of the JAX bfloat16 matmul peak" in header
  assert "peak device memory" in header
  row = next(line for line in gpu.splitlines() if line.startswith("| hade_jax, global"))
  assert "20,000 MB (host RSS 3,000 MB; XLA temporaries 100 MB)" in row
  assert "least cosine 0.9991" in gpu
  assert "`config.dropout_rng='rbg'`" in gpu
  # The GPU target row (in every targets table) reads the run's wall time and names the GPU.
  assert any(line.startswith("| GPU table:") and "| 6.0 min | 8.0 min | met |" in line
             and "| Test GPU 141 GB |" in line for line in md.splitlines())
  # The CPU section keeps its own tables.
  cpu = md[:md.index(render.GPU_HEADING)]
  assert "fraction of JAX matmul peak | peak RSS |" in cpu


def test_run_settings_other_than_the_defaults_are_named_in_the_run_table():
  spec = compare.full_spec(dropout_rng="rbg", jax_xla_flags="--xla_cpu_foo=true")
  table = render.run_table(fake_results(spec))
  assert "(quick sizes; dropout_rng=rbg; jax_xla_flags=--xla_cpu_foo=true)" in table
  assert "dropout_rng" not in render.run_table(fake_results(compare.full_spec()))
  env = compare.worker_env("jax", "cpu", "--xla_cpu_foo=true")
  assert env["XLA_FLAGS"].split()[-1] == "--xla_cpu_foo=true"
  assert "--xla_cpu_foo" not in compare.worker_env("torch", "cpu", "--xla_cpu_foo=true")[
      "XLA_FLAGS"]


def test_pair_score_reference_and_layouts_score_alike():
  # benchmarks/pair_score.py: the PyTorch all-pairs score (the side-by-side reference) and
  # hade_jax's blocked layout equal the training formula (float32 rounding: 1e-5).
  from benchmarks import pair_score

  audio, text = pair_score._features(40, 60)
  plain, _ = pair_score.run_jax("jax_plain", audio, text, tile=16)
  blocked, _ = pair_score.run_jax("jax", audio, text, tile=16)
  reference, _ = pair_score.run_torch("torch", audio, text, tile=16)
  assert plain.shape == (40, 60) and np.isfinite(plain).all()
  np.testing.assert_allclose(blocked, plain, atol=1e-5, rtol=0)
  np.testing.assert_allclose(reference, plain, atol=1e-5, rtol=0)
  same = pair_score.agreement(plain, blocked)
  assert same["top10_kept"] == 100.0 and same["recall_change"] == {"R@1": 0.0, "R@10": 0.0}
  shuffled = pair_score.agreement(plain, np.random.default_rng(0).permutation(plain))
  assert shuffled["top10_kept"] < 100.0 and shuffled["max_abs_diff"] > 1e-3


def test_pair_score_rows_and_a_target_without_results():
  from benchmarks import pair_score

  def run(impl, seconds, executed=100.0):  # executed: GFLOP run (the cut tiles run fewer)
    return {"impl": impl, "score_s": seconds, "tha_gflops": 100 / seconds,
            "executed_gflops": executed / seconds, "matmul_gflops": 4.0,
            "fraction_of_peak": executed / seconds / 4.0, "bf16_matmul_gflops": None,
            "agreement": {
                "max_abs_diff": 0.0, "top10_kept": 100.0,
                "recall_change": {"R@1": 0.0, "R@10": 0.0}}}

  res = {"machine": "m", "quick": False, "tile": 128, "date": "2026-11-30T00:00:00",
         "load_before": 0.1, "load_after": 0.2,
         "runs": [run("jax_plain", 100.0), run("jax", 50.0, executed=60.0),
                  run("torch", 80.0)]}
  rows = pair_score.table(res).splitlines()
  assert next(r for r in rows if r.startswith("| jax |")).startswith(
      "| jax | 50.0 | 2.00x | 1.60x | 2 | 1 | 30 % of 4 |")
  assert pair_score.target_values(res) == {"clotho_scoring_s": 50.0,
                                           "clotho_scoring_peak_fraction": 0.3}
  assert pair_score.target_values(res | {"quick": True}) == {}
  targets = [{"name": "scoring", "source": "pair_score", "measure": "clotho_scoring_s",
              "target": 55.0, "unit": "s", "higher_is_better": False},
             {"name": "gpu", "source": "compare_gpu", "measure": "wall_min", "target": 8.0,
              "unit": "min", "higher_is_better": False}]
  table = render.targets_table({}, targets, sources={
      "pair_score": (pair_score.target_values(res), "m")}).splitlines()
  assert "| scoring | 50.0 s | 55.0 s | met | 5.0 s to spare | m |" in table
  assert "| gpu | not measured (no `compare_gpu` results) | 8.0 min | - | - | - |" in table
  none = render.targets_table({}, targets[:1], sources={
      "pair_score": ({"clotho_scoring_s": float("inf")}, "m")})
  assert "| scoring | no measured point qualifies | 55.0 s | missed | - | m |" in none
