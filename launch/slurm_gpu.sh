#!/usr/bin/env bash
# Train hade_jax on a Slurm GPU cluster: one process per node holding all of its GPUs, the same
# command on every node, one log per node. Each process finds its place from Slurm's variables
# (hade_jax/distributed.py): SLURM_PROCID, SLURM_NTASKS, the first node as coordinator.
#
#   launch/slurm_gpu.sh SUBCOMMAND [ARGS...] [--dry-run] [--help]
#
#   setup             a virtualenv (VENV) with the project and CUDA JAX    (login node)
#   submit [FLAGS...] sbatch a job that runs `run FLAGS...`   NODES GPUS_PER_NODE CONFIG WORKDIR
#   run [FLAGS...]    inside an allocation: srun the training on every node    CONFIG WORKDIR
#                     (FLAGS go to hade_jax.train, e.g. --config.batch_size=1024)
#   logs JOB [LINES]  the last LINES (100) of each node's log of job JOB
#   status            this user's jobs named JOB_NAME
#   stop JOB          cancel job JOB
#
# Optional: JOB_NAME (hade_jax), PARTITION, ACCOUNT, TIME (e.g. 24:00:00), CPUS_PER_NODE,
# VENV (<repo>/.venv), PYTHON ($VENV/bin/python), LOG_DIR (<repo>/logs),
# JAX_CUDA (cuda12: the jax[...] extra setup installs).
# --dry-run (anywhere on the line) prints every command instead of running it.
#
# Preemption and time limits: the job asks Slurm for SIGTERM 120 s before its time limit
# (--signal below); `stop` (scancel) and preemption send SIGTERM too, then SIGKILL after the
# cluster's KillWait / GraceTime. On SIGTERM the trainer finishes its step, writes a checkpoint
# and exits; `submit` again resumes it.
#
# WORKDIR (checkpoints) and config.data.data_dir must be on a filesystem every node sees:
# every process writes its part of each checkpoint there. See docs/scaling.md.
#SBATCH --signal=TERM@120
set -euo pipefail

# Under sbatch this file runs from Slurm's spool folder: submit passes the checkout along.
REPO="${HADE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
DRY_RUN=0

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e '/^#SBATCH/d' -e 's/^# \{0,1\}//'
}

# Runs a command, or prints it on one line, quoted for the shell, with --dry-run.
run_cmd() {
  if ((DRY_RUN)); then
    local arg words=()
    for arg in "$@"; do
      if [[ "${arg}" =~ ^[-A-Za-z0-9_./=:,@%+]+$ ]]; then
        words+=("${arg}")
      else
        words+=("${arg@Q}")
      fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

need_job_id() {
  if ! [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    echo "${subcommand}: give the job id (a number), got '${1:-}'" >&2
    exit 2
  fi
}

main() {
  # --dry-run and --help are the launcher's wherever they stand (before or after the
  # subcommand, among the training flags); everything else keeps its order.
  local arg args=()
  for arg in "$@"; do
    case "${arg}" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      *) args+=("${arg}") ;;
    esac
  done
  set -- "${args[@]+"${args[@]}"}"
  subcommand=${1:-}
  if [[ -z "${subcommand}" ]]; then
    usage
    exit 2
  fi
  shift
  case "${subcommand}" in
    setup | submit | run | logs | status | stop) ;;
    *)
      echo "unknown subcommand '${subcommand}'" >&2
      usage >&2
      exit 2
      ;;
  esac

  # Required variables, checked before any command runs.
  case "${subcommand}" in
    submit)
      : "${NODES:?set NODES (the number of nodes)}"
      : "${GPUS_PER_NODE:?set GPUS_PER_NODE (e.g. 8)}"
      ;;
    run) : "${SLURM_JOB_ID:?run inside a Slurm allocation: use submit (or salloc first)}" ;;
    logs | stop) need_job_id "${1:-}" ;;
  esac
  case "${subcommand}" in
    submit | run)
      : "${CONFIG:?set CONFIG (e.g. configs/clotho.py)}"
      : "${WORKDIR:?set WORKDIR (a folder every node sees)}"
      ;;
  esac

  local venv=${VENV:-${REPO}/.venv}
  local python=${PYTHON:-${venv}/bin/python}
  local log_dir=${LOG_DIR:-${REPO}/logs}
  local job_name=${JOB_NAME:-hade_jax}

  case "${subcommand}" in
    setup)
      run_cmd python3 -m venv "${venv}"
      run_cmd "${venv}/bin/python" -m pip install -q -U pip
      run_cmd "${venv}/bin/python" -m pip install -q -e "${REPO}" "jax[${JAX_CUDA:-cuda12}]"
      ;;
    submit)
      local options=(--job-name="${job_name}" --nodes="${NODES}" --ntasks-per-node=1
        --gpus-per-node="${GPUS_PER_NODE}")
      if [[ -n "${PARTITION:-}" ]]; then options+=(--partition="${PARTITION}"); fi
      if [[ -n "${ACCOUNT:-}" ]]; then options+=(--account="${ACCOUNT}"); fi
      if [[ -n "${TIME:-}" ]]; then options+=(--time="${TIME}"); fi
      if [[ -n "${CPUS_PER_NODE:-}" ]]; then options+=(--cpus-per-task="${CPUS_PER_NODE}"); fi
      run_cmd mkdir -p "${log_dir}"
      run_cmd sbatch "${options[@]}" --chdir="${REPO}" --output="${log_dir}/%x-%j.out" \
        --export=ALL,HADE_REPO="${REPO}" "${REPO}/launch/slurm_gpu.sh" run "$@"
      ;;
    run)
      # One task per node, all of the node's GPUs; %t: one log per task (= node).
      # --kill-on-bad-exit: one failed process ends all, rather than leaving them waiting.
      run_cmd mkdir -p "${log_dir}"
      run_cmd srun --nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" --ntasks-per-node=1 \
        --kill-on-bad-exit=1 --output="${log_dir}/train-%j-%t.log" \
        "${python}" -m hade_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@"
      ;;
    logs)
      local lines=${2:-100}
      if ! [[ "${lines}" =~ ^[0-9]+$ ]]; then
        echo "logs: LINES must be a number, got '${lines}'" >&2
        exit 2
      fi
      run_cmd tail -n "${lines}" "${log_dir}/train-$1-"*.log
      ;;
    status)
      run_cmd squeue -u "${USER:-$(id -un)}" --name="${job_name}"
      ;;
    stop)
      run_cmd scancel "$1"
      ;;
  esac
}

main "$@"
