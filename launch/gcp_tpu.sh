#!/usr/bin/env bash
# Train hade_jax on a Cloud TPU VM slice: one process per worker, the same command on every
# worker, one log per worker. JAX finds the slice's workers itself (hade_jax/distributed.py).
#
#   launch/gcp_tpu.sh SUBCOMMAND [ARGS...] [--dry-run] [--help]
#
#   create          create the slice                     TPU_NAME ZONE ACCELERATOR_TYPE
#   copy            copy this checkout to every worker   TPU_NAME ZONE
#   setup           install it on every worker           TPU_NAME ZONE
#   run [FLAGS...]  start training on every worker       TPU_NAME ZONE CONFIG WORKDIR
#                   (FLAGS go to hade_jax.train, e.g. --config.batch_size=1024)
#   logs [LINES]    the last LINES (100) of each worker's log (or WORKER's)   TPU_NAME ZONE
#   stop            stop the training on every worker:   TPU_NAME ZONE
#                   SIGTERM, then up to STOP_GRACE_SECONDS (120) for the trainer to write
#                   a checkpoint and exit, then SIGKILL. Stop before delete.
#   delete          delete the slice (gcloud asks first) TPU_NAME ZONE
#
# Optional: PROJECT (gcloud's default otherwise), RUNTIME_VERSION (tpu-ubuntu2204-base),
# REMOTE_DIR (hade_jax, in the worker's home), PYTHON (python3 on the workers).
# --dry-run (anywhere on the line) prints every command instead of running it.
#
# WORKDIR (checkpoints) and config.data.data_dir must be the same shared folder on every
# worker (a Filestore/NFS share, or a gcsfuse mount that may rename folders): every process
# writes its part of each checkpoint there. See docs/scaling.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
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

# The same command on every worker (or on WORKER), in the slice's zone and project.
tpu_ssh() {
  local command=$1
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${project_flag[@]}" \
    --worker="${2:-all}" --command="${command}"
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
  local subcommand=${1:-}
  if [[ -z "${subcommand}" ]]; then
    usage
    exit 2
  fi
  shift
  case "${subcommand}" in
    create | copy | setup | run | logs | stop | delete) ;;
    *)
      echo "unknown subcommand '${subcommand}'" >&2
      usage >&2
      exit 2
      ;;
  esac

  # Required variables, checked before any command runs.
  : "${TPU_NAME:?set TPU_NAME (the TPU VM slice name)}"
  : "${ZONE:?set ZONE (e.g. us-central2-b)}"
  case "${subcommand}" in
    create) : "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE (e.g. v4-32)}" ;;
    run)
      : "${CONFIG:?set CONFIG (e.g. configs/clotho.py)}"
      : "${WORKDIR:?set WORKDIR (a folder shared by all workers)}"
      ;;
  esac

  local remote_dir=${REMOTE_DIR:-hade_jax}
  local python=${PYTHON:-python3}
  project_flag=()
  if [[ -n "${PROJECT:-}" ]]; then
    project_flag=(--project="${PROJECT}")
  fi
  # Each worker's own log and pid file: the command is the same, the host name is not.
  local log="logs/train-\$(hostname).log"
  local pid="logs/train-\$(hostname).pid"

  case "${subcommand}" in
    create)
      run_cmd gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
        "${project_flag[@]}" --accelerator-type="${ACCELERATOR_TYPE}" \
        --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
      ;;
    copy)
      # A local scratch folder for the archive, removed on exit (with --dry-run too).
      archive_dir="$(mktemp -d)"
      trap 'rm -rf "${archive_dir}"' EXIT
      local archive="${archive_dir}/hade_jax.tar.gz"
      run_cmd tar -czf "${archive}" -C "${REPO}" --exclude=.git --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=.venv .
      run_cmd gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:hade_jax.tar.gz" \
        --zone="${ZONE}" "${project_flag[@]}" --worker=all
      tpu_ssh "mkdir -p ${remote_dir} && tar -xzf hade_jax.tar.gz -C ${remote_dir} && rm hade_jax.tar.gz"
      ;;
    setup)
      tpu_ssh "cd ${remote_dir} && ${python} -m pip install -q -U pip && ${python} -m pip install -q -e . 'jax[tpu]'"
      ;;
    run)
      local flags=(--config="${CONFIG}" --workdir="${WORKDIR}" "$@")
      local quoted
      quoted="$(printf '%q ' "${flags[@]}")"
      tpu_ssh "cd ${remote_dir} && mkdir -p logs && { setsid nohup ${python} -m hade_jax.train ${quoted}> ${log} 2>&1 < /dev/null & echo \$! > ${pid}; }"
      ;;
    logs)
      local lines=${1:-100}
      if ! [[ "${lines}" =~ ^[0-9]+$ ]]; then
        echo "logs: LINES must be a number, got '${lines}'" >&2
        exit 2
      fi
      tpu_ssh "cd ${remote_dir} && echo \"== \$(hostname) ==\" && tail -n ${lines} ${log}" \
        "${WORKER:-all}"
      ;;
    stop)
      # The whole process group (setsid made the trainer its leader): Grain workers too.
      # SIGTERM first: the trainer checkpoints and exits; SIGKILL only after the grace period.
      local grace=${STOP_GRACE_SECONDS:-120}
      if ! [[ "${grace}" =~ ^[0-9]+$ ]]; then
        echo "stop: STOP_GRACE_SECONDS must be a number, got '${grace}'" >&2
        exit 2
      fi
      local group="-\$(cat ${pid})"
      tpu_ssh "cd ${remote_dir} && if [ -f ${pid} ]; then kill -- -\$(cat ${pid}) || true; for i in \$(seq ${grace}); do kill -0 -- ${group} 2> /dev/null || break; sleep 1; done; kill -KILL -- ${group} 2> /dev/null || true; rm -f ${pid}; fi"
      ;;
    delete)
      run_cmd gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" "${project_flag[@]}"
      ;;
  esac
}

main "$@"
