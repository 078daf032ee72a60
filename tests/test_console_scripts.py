"""The commands `pip install` puts on the PATH (setup.py console_scripts): each names an
importable function that runs the same command as its `python -m` form."""

import importlib
import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = {"hade-train": "hade_jax.train", "hade-eval": "hade_jax.eval",
            "hade-search": "hade_jax.search", "hade-prepare": "data_pipelines.prepare",
            "hade-serve": "hade_jax.serve",
            "hade-classify": "hade_jax.classify",
            "hade-report": "hade_jax.report",
            "hade-export": "hade_jax.export"}


def console_scripts(monkeypatch) -> dict[str, str]:
  """setup.py's console_scripts as {command: 'module:function'}, read without installing."""
  seen = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kwargs: seen.update(kwargs))
  monkeypatch.chdir(ROOT)  # setup.py reads README.md from its folder
  runpy.run_path(str(ROOT / "setup.py"))
  out = {}
  for line in seen["entry_points"]["console_scripts"]:
    name, _, target = (s.strip() for s in line.partition("="))
    out[name] = target
  return out


def test_console_scripts_are_the_expected_commands(monkeypatch):
  scripts = console_scripts(monkeypatch)
  assert {k: v.partition(":")[0] for k, v in scripts.items()} == EXPECTED


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_console_script_help_exits_0(command, monkeypatch, capsys):
  module_name, _, function = console_scripts(monkeypatch)[command].partition(":")
  module = importlib.import_module(module_name)
  entry = getattr(module, function)
  assert callable(entry)
  monkeypatch.setattr(sys, "argv", [command, "--help"])
  with pytest.raises(SystemExit) as exit_info:
    entry()  # no arguments: the script wrapper pip writes calls it so
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert f"python -m {module_name}" in out  # the help of the `python -m` form itself


def test_console_script_usage_error_exits_2(monkeypatch):
  """The same error handling as `python -m hade_jax.train` (cli.main_entry): exit status 2.
  In a subprocess: after an error main_entry closes stderr, which pytest still needs."""
  target = console_scripts(monkeypatch)["hade-train"]
  module_name, _, function = target.partition(":")
  code = (f"import sys; sys.argv = ['hade-train', '--no_such_flag']; "
          f"from {module_name} import {function}; {function}()")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120, check=False)
  assert done.returncode == 2, done.stderr
  assert "error:" in done.stderr and "no_such_flag" in done.stderr
