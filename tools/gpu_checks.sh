#!/usr/bin/env bash
# The GPU checks, first thing in a session lent a GPU: install on a bare machine, then the GPU
# test (tests/test_gpu.py: a bfloat16 training step on the GPU against float32 on the CPU) and
# the GPU comparison (`python -m benchmarks.run --device=gpu --quick`, about 6 minutes on one
# H200 after the install), leaving their outputs under OUT.
#
#   OUT=/path/to/folder tools/gpu_checks.sh [--dry-run] [--help]
#
# Steps, each logged to OUT/<step>.log, with its seconds in OUT/gpu_checks.json:
#   install  a virtualenv (VENV, <repo>/.venv_gpu) with the project, CUDA JAX
#            (jax[JAX_CUDA], cuda12), torch==2.13.0 (its CUDA build) and the test tools;
#            skipped when VENV already imports a JAX that sees a GPU
#   devices  nvidia-smi and the devices JAX sees (stops here without a GPU)
#   test     pytest tests/test_gpu.py (OUT/test_gpu.xml), with JAX_PLATFORMS=cuda,cpu (the
#            tests' conftest.py defaults to cpu)
#   bench    the comparison, killed after BENCH_TIMEOUT seconds (540); its results
#            (benchmarks/results/compare_gpu.json) and the re-rendered BENCHMARKS.md are copied
#            to OUT
# Optional: PYTHON (python3, makes the virtualenv), VENV, JAX_CUDA (cuda12; cuda13 when the
# machine's driver wants it), BENCH_TIMEOUT, SKIP_BENCH=1 (install and test only).
# --dry-run prints every command instead of running it. A failed test or benchmark does not
# stop the other; the script then exits 1 (OUT/gpu_checks.json has each step's status).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
for arg in "$@"; do
  case "${arg}" in
    --dry-run) DRY_RUN=1 ;;
    --help | -h)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "gpu_checks.sh: unknown argument '${arg}' (use --dry-run or --help)" >&2
      exit 2
      ;;
  esac
done

OUT="${OUT:?set OUT to the folder for the logs and results}"
VENV="${VENV:-${REPO}/.venv_gpu}"
PY="${VENV}/bin/python"
JAX_CUDA="${JAX_CUDA:-cuda12}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-540}"
TIMES=()
FAILED=0

# Runs a step's command with its output in OUT/<step>.log (and on the console), or prints it.
step() {
  local name=$1
  shift
  if ((DRY_RUN)); then
    printf '%s:' "${name}"
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  local start=${SECONDS} status=0
  echo "== ${name}: $*"
  "$@" 2>&1 | tee "${OUT}/${name}.log" || status=$?
  TIMES+=("\"${name}\": {\"seconds\": $((SECONDS - start)), \"status\": ${status}}")
  write_summary
  return "${status}"
}

write_summary() {
  local IFS=,
  echo "{${TIMES[*]}}" >"${OUT}/gpu_checks.json"
}

has_gpu() {
  [[ -x "${PY}" ]] && JAX_PLATFORMS=cuda,cpu "${PY}" -c \
    "import jax, sys; sys.exit(not any(d.platform == 'gpu' for d in jax.devices()))" \
    >/dev/null 2>&1
}

# shellcheck disable=SC2329  # run by `step install install`
install() {
  "${PYTHON:-python3}" -m venv "${VENV}"
  "${PY}" -m pip install -q -U pip
  # One resolution for CUDA JAX and CUDA torch, so that their NVIDIA libraries agree.
  "${PY}" -m pip install -q -e "${REPO}[gpu]" "jax[${JAX_CUDA}]"
}

# shellcheck disable=SC2329  # run by `step bench bench`
bench() {
  timeout "${BENCH_TIMEOUT}" "${PY}" -m benchmarks.run --device=gpu --quick
  cp "${REPO}/benchmarks/results/compare_gpu.json" "${REPO}/BENCHMARKS.md" "${OUT}/"
}

if ((!DRY_RUN)); then
  mkdir -p "${OUT}"
fi
cd "${REPO}"
if has_gpu; then
  echo "== install: ${VENV} already sees a GPU"
else
  step install install
fi
step devices bash -c "nvidia-smi; JAX_PLATFORMS=cuda,cpu '${PY}' -c \
  'import jax; print(jax.__version__, jax.devices())'"
if ((!DRY_RUN)) && ! has_gpu; then
  echo "gpu_checks.sh: JAX in ${VENV} sees no GPU (OUT/devices.log); check the driver" \
    "(nvidia-smi) and JAX_CUDA (${JAX_CUDA}), then rerun" >&2
  exit 1
fi
step test env JAX_PLATFORMS=cuda,cpu "${PY}" -m pytest -q -rs tests/test_gpu.py \
  --junitxml="${OUT}/test_gpu.xml" || FAILED=1
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  step bench bench || FAILED=1
fi
exit "${FAILED}"
