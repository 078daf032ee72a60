"""Zero-shot classification: the prompt ensemble against a hand computation, the command line
against the API, bad inputs, and the accuracy metric against hand-computed cases."""

import json
import pathlib

import numpy as np
import pytest
import soundfile

from data_pipelines import audio_io
from hade_jax import api, classify, cli, metrics, retrieval, zero_shot
from tests.tiny_train_config import save_random_checkpoint

LABELS = ["dog_bark", "rain", "church bells", "siren"]
TEMPLATES = ["This is a sound of {}.", "{} can be heard.", "a recording of {}"]


# -- Pure parts: prompts, ensemble, metrics -----------------------------------------------------


def test_prompts_are_label_major_with_underscores_read_as_spaces():
  texts = zero_shot.prompts(["dog_bark", "rain"], ["A {}.", "{} here"])
  assert texts == ["A dog bark.", "dog bark here", "A rain.", "rain here"]
  scores_AxT = np.array([[1.0, 3.0, 10.0, 20.0]])
  np.testing.assert_allclose(zero_shot.ensemble(scores_AxT, 2, 2), [[2.0, 15.0]])


def test_rank_orders_by_score_then_given_label_order():
  scores_AxL = np.array([[0.2, 0.5, 0.5, 0.1]])
  ranked = zero_shot.rank(scores_AxL, ["a", "b", "c", "d"], logit_scale=10.0, top_k=3)[0]
  assert [s.label for s in ranked] == ["b", "c", "a"]  # b and c tie: the order given
  z = np.exp(10.0 * (scores_AxL[0] - 0.5))
  np.testing.assert_allclose([s.probability for s in ranked], (z / z.sum())[[1, 2, 0]])
  with pytest.raises(ValueError, match="top_k=0"):
    zero_shot.rank(scores_AxL, ["a", "b", "c", "d"], logit_scale=10.0, top_k=0)


@pytest.mark.parametrize(("templates", "match"), [
    ([], "no templates"), ([""], "template 1 of 1 is empty"),
    (["A {}.", "   "], "template 2 of 2 is empty"), (["no placeholder"], "holds 0"),
    (["{} and {}"], "holds 2"), ("A {}.", "one string")])
def test_bad_templates_are_named(templates, match):
  with pytest.raises(ValueError, match=match):
    zero_shot.check_templates(templates)


@pytest.mark.parametrize(("labels", "match"), [
    ([], "no labels"), (["dog", " "], "label 2 of 2"), (["dog", "cat", "dog"], "given twice"),
    ("dog", "one string")])
def test_bad_labels_are_named(labels, match):
  with pytest.raises(ValueError, match=match):
    zero_shot.check_labels(labels)


def test_zero_shot_accuracy_hand_computed():
  scores_AxL = np.array([[0.9, 0.1, 0.0],   # true 0: rank 1
                         [0.5, 0.5, 0.2],   # true 1: tie with class 0 -> rank 1 (tie rule)
                         [0.3, 0.2, 0.1],   # true 2: rank 3
                         [0.1, 0.8, 0.7],   # true 2: rank 2
                         [0.0, 0.4, 0.9]])  # true 0: rank 3
  true_A = np.array([0, 1, 2, 2, 0])
  out = metrics.zero_shot_accuracy(scores_AxL, true_A, ["dog", "rain", "siren"])
  assert out["zero_shot/top1"] == pytest.approx(100 * 2 / 5)
  assert out["zero_shot/top5"] == pytest.approx(100.0)  # 3 classes: every class is in the top 5
  assert out["zero_shot/per_class/dog"] == pytest.approx(50.0)
  assert out["zero_shot/per_class/rain"] == pytest.approx(100.0)
  assert out["zero_shot/per_class/siren"] == pytest.approx(0.0)
  assert out["zero_shot/mean_per_class"] == pytest.approx(50.0)
  np.testing.assert_array_equal(metrics.class_ranks(scores_AxL, true_A), [1, 1, 3, 2, 3])


def test_zero_shot_top5_counts_ranks_up_to_five_and_leaves_out_absent_classes():
  scores_AxL = np.tile(np.arange(7.0)[::-1], (2, 1))  # class c has rank c + 1
  out = metrics.zero_shot_accuracy(scores_AxL, np.array([4, 5]))
  assert out["zero_shot/top5"] == pytest.approx(50.0)
  assert sorted(k for k in out if "/per_class/" in k) == ["zero_shot/per_class/4",
                                                         "zero_shot/per_class/5"]


def test_zero_shot_accuracy_refuses_non_finite_scores_and_bad_classes():
  with pytest.raises(metrics.NonFiniteScoresError, match="NaN or Inf"):
    metrics.zero_shot_accuracy(np.array([[np.nan, 0.1], [0.2, 0.1]]), np.array([1, 0]))
  with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
    metrics.zero_shot_accuracy(np.zeros((2, 2)), np.array([0, 2]))
  with pytest.raises(ValueError, match="one true class per clip"):
    metrics.zero_shot_accuracy(np.zeros((2, 2)), np.array([0]))


# -- With a tiny random model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, minilm_dir) -> pathlib.Path:
  return save_random_checkpoint(tmp_path_factory.mktemp("wd"), minilm_dir)


@pytest.fixture(scope="module")
def hade(workdir) -> api.Hade:
  return api.Hade.load(workdir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
  """Three different 1.5 s sounds at 16 kHz: a tone, noise and a chirp."""
  folder = tmp_path_factory.mktemp("audio")
  t = np.arange(24_000) / 16_000
  rng = np.random.default_rng(0)
  waves = {"tone.wav": 0.5 * np.sin(2 * np.pi * 440 * t),
           "noise.wav": 0.3 * rng.standard_normal(len(t)),
           "chirp.wav": 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)}
  for name, wave in waves.items():
    soundfile.write(folder / name, wave.astype(np.float32), 16_000)
  return [str(folder / name) for name in waves]


def test_classify_is_the_mean_over_templates_of_hand_scored_prompts(hade, clips):
  ranked = hade.classify(clips, LABELS, templates=TEMPLATES)
  # By hand: the prompts written out, scored by the untiled model, averaged in a loop.
  audio = hade.embed_audio(clips)
  texts = [(j, t.replace("{}", label.replace("_", " ")))
           for j, label in enumerate(LABELS) for t in TEMPLATES]
  scores_AxT = retrieval.score_untiled(hade.model, audio, hade.embed_text([t for _, t in texts]))
  expected_AxL = np.zeros((len(clips), len(LABELS)))
  for column, (j, _) in enumerate(texts):
    expected_AxL[:, j] += scores_AxT[:, column] / len(TEMPLATES)
  scale = float(hade.model.heads.logit_scale_value())
  for a, clip_ranking in enumerate(ranked):
    assert [s.label for s in clip_ranking] == [LABELS[j] for j in
                                               np.argsort(-expected_AxL[a], kind="stable")]
    got = {s.label: s.score for s in clip_ranking}
    np.testing.assert_allclose([got[x] for x in LABELS], expected_AxL[a], rtol=1e-5, atol=1e-5)
    z = np.exp(scale * (expected_AxL[a] - expected_AxL[a].max()))
    probs = {s.label: s.probability for s in clip_ranking}
    np.testing.assert_allclose([probs[x] for x in LABELS], z / z.sum(), rtol=1e-4, atol=1e-6)
  # Clips differ, so their rankings are not all one constant list.
  assert len({tuple(s.score for s in r) for r in ranked}) == len(clips)


def test_classify_is_deterministic_and_takes_features_or_arrays(hade, clips):
  first = hade.classify(clips, LABELS, top_k=2)
  assert [len(r) for r in first] == [2] * len(clips)
  assert hade.classify(clips, LABELS, top_k=2) == first
  assert hade.classify(hade.embed_audio(clips), LABELS, top_k=2) == first
  waves = [soundfile.read(c, dtype="float32")[0] for c in clips]
  from_arrays = hade.classify(waves, LABELS, top_k=2, sample_rate=16_000)
  assert [[s.label for s in r] for r in from_arrays] == [[s.label for s in r] for r in first]


def test_classify_api_errors_name_the_problem(hade, clips, tmp_path):
  with pytest.raises(ValueError, match="template 1 of 1 is empty"):
    hade.classify(clips, LABELS, templates=[""])
  with pytest.raises(ValueError, match="no labels"):
    hade.classify(clips, [])
  with pytest.raises(audio_io.AudioError, match="missing.wav"):
    hade.classify([str(tmp_path / "missing.wav")], LABELS)


def test_cli_prints_what_the_api_returns(workdir, hade, clips, capsys):
  doc = classify.main([f"--model={workdir}", f"--labels={','.join(LABELS)}", "--top_k=3",
                       "--json", *clips])
  printed = json.loads(capsys.readouterr().out)
  assert printed == doc
  assert printed["templates"] == list(zero_shot.DEFAULT_TEMPLATES)
  ranked = hade.classify(clips, LABELS, top_k=3)
  assert [r["audio"] for r in printed["results"]] == clips
  for result, expected in zip(printed["results"], ranked, strict=True):
    assert [x["label"] for x in result["labels"]] == [s.label for s in expected]
    np.testing.assert_allclose([x["score"] for x in result["labels"]],
                               [s.score for s in expected], rtol=1e-6)
  classify.main([f"--model={workdir}", f"--labels={','.join(LABELS)}", "--top_k=3", *clips])
  table = capsys.readouterr().out.splitlines()
  assert table == classify.format_table(clips, ranked).splitlines()
  assert table[1].split()[-1] == ranked[0][0].label.split()[-1]


def test_cli_templates_file_matches_the_api(workdir, hade, clips, tmp_path, capsys):
  templates = tmp_path / "templates.txt"
  templates.write_text("\n".join(TEMPLATES) + "\n\n")
  labels = tmp_path / "labels.txt"
  labels.write_text("\n".join(LABELS) + "\n")
  doc = classify.main([f"--model={workdir}", f"--labels_file={labels}",
                       f"--templates_file={templates}", "--top_k=0", "--json", clips[0]])
  capsys.readouterr()
  expected = hade.classify(clips[:1], LABELS, templates=TEMPLATES)[0]
  assert doc["templates"] == TEMPLATES
  assert [x["label"] for x in doc["results"][0]["labels"]] == [s.label for s in expected]


@pytest.mark.parametrize(("args", "match"), [
    (["--labels=", "CLIP"], "no labels"),
    (["--labels=dog,rain", "MISSING.wav"], "no audio file MISSING.wav"),
    (["--labels=dog,rain"], "no audio: give one or more audio files"),
    (["--labels=dog,dog", "CLIP"], "given twice"),
    (["--labels_file=NOFILE.txt", "CLIP"], "--labels_file=NOFILE.txt: no such file"),
    (["--labels=dog", "--templates_file=@BLANK", "CLIP"], "no templates"),
    (["--labels=dog", "--templates_file=@BAD", "CLIP"], "holds 0 '{}'"),
])
def test_cli_bad_inputs_give_one_line_and_exit_2(workdir, clips, tmp_path, capsys, args, match):
  (tmp_path / "blank.txt").write_text("\n  \n")  # blank lines only: no template
  (tmp_path / "bad.txt").write_text("a sound\n")
  files = {"@BLANK": str(tmp_path / "blank.txt"), "@BAD": str(tmp_path / "bad.txt")}
  argv = [f"--model={workdir}"]
  for a in args:
    for key, path in files.items():
      a = a.replace(key, path)
    argv.append(clips[0] if a == "CLIP" else a)
  assert cli.run(classify.main, argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_zero_shot_metrics_helper_matches_the_api_scores(hade, clips):
  audio = hade.embed_audio(clips)
  true_A = np.array([0, 3, 1])
  out = zero_shot.zero_shot_metrics(hade.encoder, hade.tokenizer, audio, LABELS, true_A,
                                    TEMPLATES, batch_size=4, tile=2)
  expected = metrics.zero_shot_accuracy(hade.label_scores(audio, LABELS, TEMPLATES), true_A,
                                        LABELS)
  assert out == pytest.approx(expected)
  assert set(out) >= {"zero_shot/top1", "zero_shot/top5", "zero_shot/per_class/dog_bark"}
