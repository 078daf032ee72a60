"""The command line of train, prepare, eval and search (hade_jax/cli.py): one flag system, the
same multi-process flags everywhere, and user errors as one message with a non-zero exit status
(2: command line or config, 1: while running), the traceback only on request.
"""

import ast
import errno
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from data_pipelines import builders, prepare
from hade_jax import cli, preflight, search, train
from hade_jax import eval as hade_eval

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train": train, "prepare": prepare, "eval": hade_eval, "search": search}


@pytest.fixture(autouse=True)
def _quiet_and_in_the_checkout(monkeypatch):
  monkeypatch.chdir(ROOT)  # configs/... paths as a user types them
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)


def run(module, args, capsys) -> tuple[int, str]:
  """(exit status, stderr) of an entry point run as a command, in this process."""
  capsys.readouterr()
  status = cli.run(module.main, args)
  return status, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_cli_every_entry_point_has_the_same_distributed_flags_and_help(name, capsys):
  with pytest.raises(SystemExit) as e:
    ENTRY_POINTS[name].main(["--help"])
  assert e.value.code == 0
  printed = capsys.readouterr().out
  for flag in ("--coordinator_address", "--num_processes", "--process_id", "--[no]verbose"):
    assert flag in printed, (name, flag)


def test_cli_search_does_not_import_eval():
  tree = ast.parse((ROOT / "hade_jax" / "search.py").read_text())
  imported = {(node.module or "") + "." + alias.name for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) for alias in node.names}
  imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
  assert "hade_jax.eval" not in imported and not any(i.endswith(".eval") for i in imported)


@pytest.mark.parametrize("module, args", [
    (train, ["--config=configs/dmeo.py", "--workdir=/tmp/never_created"]),
    (hade_eval, ["--workdir=/tmp/never_created", "--config=configs/dmeo.py"]),
    (search, ["index", "--workdir=/tmp/x", "--audio_dir=/tmp", "--out=/tmp/y",
              "--config=configs/dmeo.py:ablation=tha"]),
])
def test_cli_missing_config_file(module, args, capsys):
  status, err = run(module, args, capsys)
  assert status == 2
  spec = next(a for a in args if a.startswith("--config="))
  assert err == f"error: no config file configs/dmeo.py ({spec}; from {ROOT})\n"
  assert "ErrorConfig" not in err and "Traceback" not in err
  assert not pathlib.Path("/tmp/never_created").exists()


def test_cli_override_typo(capsys):
  status, err = run(train, ["--config=configs/clotho.py", "--config.optim.lrr=1",
                            "--workdir=/tmp/never_created"], capsys)
  assert status == 2
  assert err.count("\n") == 1  # one line
  assert err.startswith("error: --config.optim.lrr=1: the config has no key 'optim.lrr'")
  assert "closest valid keys: optim.lr" in err
  # A typo in the last part of a key.
  status, err = run(train, ["--config=configs/demo.py", "--config.batch_sise=3",
                            "--workdir=/tmp/never_created"], capsys)
  assert status == 2 and "'batch_sise'; closest valid keys: batch_size" in err
  # --set (eval, search index) on a config: the same message.
  config = ml_collections.ConfigDict({"eval_tile": 8, "optim": {"lr": {"heads": 1.0}}})
  with pytest.raises(cli.UsageError, match=r"no key 'optim.lr.head'; closest valid keys: "
                                           r"optim.lr.heads"):
    cli.apply_overrides(config, ["eval_tile=7", "optim.lr.head=2"])
  assert config.eval_tile == 7
  # A group of keys set as one value.
  status, err = run(train, ["--config=configs/clotho.py", "--config.optim.lr=0.1",
                            "--workdir=/tmp/never_created"], capsys)
  assert status == 2 and "optim.lr holds the keys backbone, heads" in err


@pytest.mark.parametrize("module, args, message", [
    (train, ["--config=configs/demo.py"], "--workdir is required"),
    (train, ["--config=configs/demo.py", "--workdir=/tmp/x", "--confg=1"],
     "Unknown command line flag 'confg'"),
    (hade_eval, ["--split=test"], "--checkpoint is required"),
    (hade_eval, ["--workdir=/tmp/x", "--split=test", "--csv=c.csv"], "--split or --csv"),
    (hade_eval, ["--workdir=/tmp/x", "--shortlists=10,many"], "--shortlists=10,many"),
    (search, ["--index=/tmp/x", "a query"], "first argument must be a subcommand"),
    (search, ["query", "--index=/tmp/x", "--audio_dir=/tmp", "a query"],
     "query does not take --audio_dir"),
    (search, ["query", "--index=/tmp/x"], "query needs at least one text query"),
    (search, ["index", "--audio_dir=/tmp"], "index needs --out"),
    (prepare, ["--dataset=clotho"], "--dataset and --data_dir are required"),
    (prepare, ["--dataset=imagenet", "--data_dir=/tmp"], "flag --dataset=imagenet"),
])
def test_cli_usage_errors_exit_2_with_one_line(module, args, message, capsys):
  status, err = run(module, args, capsys)
  assert status == 2
  assert err.startswith("error: ") and message in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_missing_data_one_message(tmp_path):
  """The README's headline command on a machine without Clotho: one message listing the
  prepared data (with its prepare command), the tokenizer and the towers (with their flags)."""
  env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(ROOT))  # ~/tensorflow_datasets
  env.pop(cli.VERBOSE_ENV, None)
  result = subprocess.run(
      [sys.executable, "-m", "hade_jax.train", "--config=configs/clotho.py",
       f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 2, result.stderr
  err = result.stderr
  assert "Traceback" not in err and err.count("error:") == 1
  message = err[err.index("error:"):]
  assert message.startswith("error: cannot start training, missing:")
  assert f"no prepared clotho/48k in {tmp_path / 'tensorflow_datasets'}" in message
  assert "python -m data_pipelines.prepare --dataset=clotho --config=48k" in message
  assert "config.data.tokenizer_dir is empty; set --config.data.tokenizer_dir=DIR" in message
  assert "--config.init.clap=DIR" in message and "--config.init.text_tower=DIR" in message
  assert not (tmp_path / "wd").exists()  # nothing was built or written


def test_cli_preflight_names_missing_init_paths_unless_the_workdir_resumes(tmp_path):
  config = ml_collections.ConfigDict({
      "data": {"dataset": "synthcaps", "prepare_if_missing": True, "data_dir": str(tmp_path),
               "builder_config": "16k", "synth_size": "tiny", "tokenizer_dir": str(tmp_path)},
      "init": {"resume": "", "clap": str(tmp_path / "clap"), "audio_tower": "",
               "text_tower": ""}})
  (tmp_path / "vocab.txt").write_text("[PAD]\n")
  assert preflight.missing_inputs(config) == [
      f"config.init.clap: no {tmp_path / 'clap'} (a Hugging Face ClapModel folder (both "
      "towers); --config.init.clap=DIR)"]
  with pytest.raises(preflight.MissingInputs, match="config.init.clap") as e:
    preflight.check(config, tmp_path / "wd")
  assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, cli.UsageError)
  assert cli.describe(e.value)[0] == 2
  # A workdir with a checkpoint resumes from it: the init paths are not read.
  (tmp_path / "wd" / "checkpoints" / "20").mkdir(parents=True)
  preflight.check(config, tmp_path / "wd")
  (tmp_path / "vocab.txt").unlink()
  assert preflight.missing_inputs(config, tmp_path / "wd") == [
      f"tokenizer: no tokenizer.json or vocab.txt or vocab.json in {tmp_path} "
      "(--config.data.tokenizer_dir)"]


def synthcaps_args(data_dir: pathlib.Path) -> list[str]:
  return ["--dataset=synthcaps", "--synth_clips=train=2,validation=1,test=1",
          "--synth_clip_seconds=4", "--sample_rate=16000", f"--data_dir={data_dir}",
          "--num_workers=1", "--progress=false"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["direct", "wrapped"])
def test_cli_disk_full(wrapped, tmp_path, monkeypatch, capsys):
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "shard.json"))

  def write_fails(path, obj):
    if not wrapped:
      raise full
    try:
      raise full
    except OSError as e:  # as a library's background writer reports it
      raise RuntimeError("Event loop is closed") from e

  monkeypatch.setattr(builders, "_atomic_write_json", write_fails)
  status, err = run(prepare, synthcaps_args(tmp_path), capsys)
  assert status == 1
  assert err.lower().count("no space left on device") == 1  # the cause, once
  assert f"writing {tmp_path / 'shard.json'} (errno ENOSPC)" in err
  assert "Traceback" not in err and "Event loop" not in err
  assert len(err[err.index("error:"):].splitlines()) == 2  # the message and the --verbose hint


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_cli_verbose_shows_the_traceback(how, tmp_path, monkeypatch, capsys):
  args = ["query", f"--index={tmp_path / 'no_index'}", "a dog"]
  status, err = run(search, args, capsys)
  assert status == 1 and "Traceback" not in err
  assert err.startswith(f"error: no index at {tmp_path / 'no_index'}")
  assert "--verbose" in err and cli.VERBOSE_ENV in err
  if how == "flag":
    args.append("--verbose")
  else:
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  status, err = run(search, args, capsys)
  assert status == 1
  assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
  assert err.rstrip().splitlines()[-1].startswith("error: no index at")


def test_cli_prepare_runs_on_process_0_only(tmp_path, capsys):
  args = synthcaps_args(tmp_path) + ["--coordinator_address=localhost:1", "--num_processes=2",
                                     "--process_id=1"]
  assert prepare.main(args) == 0
  assert "process 0 prepares the data" in capsys.readouterr().out
  assert list(tmp_path.iterdir()) == []
