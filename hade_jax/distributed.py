"""Multi-process JAX: one process per host (TPU VM worker, GPU node), started before any device.

Where the coordinator address, the process count and this process's id come from, first that
applies (each of the three is looked up on its own):
  1. flags        --coordinator_address=HOST:PORT --num_processes=N --process_id=I (of every
                  command: hade_jax/cli.py), or the arguments of `initialize`
  2. environment  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  3. Slurm        inside an `srun` step: SLURM_NTASKS, SLURM_PROCID, and the first host of
                  SLURM_STEP_NODELIST (port JAX_COORDINATOR_PORT, else one derived from
                  SLURM_JOB_ID, as JAX's own Slurm detection does)
When none of them is set: on a Cloud TPU VM, `jax.distributed.initialize()` finds the slice's
workers itself (metadata server); anywhere else the run is a single process.

Every local accelerator belongs to the one process of its host. For one process per GPU, set
JAX_LOCAL_DEVICE_IDS (read by JAX) or let Slurm bind one GPU per task (--gpus-per-task=1).
On CPU (tests, `--num_processes=2` on one machine) the cross-process collectives are Gloo.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run.

  Attributes:
    mode: 'single' (no initialisation), 'explicit' (all three values known) or 'cloud_tpu'
      (`jax.distributed.initialize()` detects them).
    coordinator_address: HOST:PORT ('explicit' only).
    num_processes: the number of processes ('explicit' only).
    process_id: this process's index ('explicit' only).
    source: where the values came from, for the log and for error messages.
  """

  mode: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  source: str = ""


def first_slurm_host(nodelist: str) -> str:
  """The first host of a Slurm hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
  m = re.fullmatch(r"([^,\[]+)(?:\[([^\]]+)\]([^,]*))?(?:,.*)?", nodelist.strip())
  if not m:
    raise ValueError(f"cannot read the first host of the Slurm node list {nodelist!r}; set "
                     "JAX_COORDINATOR_ADDRESS=HOST:PORT (the first node) instead")
  prefix, ranges, suffix = m.groups()
  if ranges is None:
    return prefix
  return prefix + re.split(r"[,-]", ranges)[0] + suffix


def _int(value: str, name: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, environ: Mapping[str, str] | None = None,
         on_cloud_tpu: bool = False) -> Plan:
  """Decides how to initialise from flag values and the environment (module docstring)."""
  env = os.environ if environ is None else environ
  sources = {}

  def pick(name, flag_value, env_name, slurm_value):
    if flag_value is not None:
      sources[name] = f"--{name}"
      return flag_value
    if env.get(env_name):
      sources[name] = env_name
      return env[env_name]
    if slurm_value is not None:
      sources[name] = "Slurm"
      return slurm_value
    return None

  in_srun = all(k in env for k in ("SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_PROCID"))
  slurm_count = slurm_id = slurm_coordinator = None
  if in_srun:
    slurm_count, slurm_id = env["SLURM_NTASKS"], env["SLURM_PROCID"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist:
      port = env.get("JAX_COORDINATOR_PORT") or str(
          _int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") % 4096 + 61440)
      slurm_coordinator = f"{first_slurm_host(nodelist)}:{port}"
  address = pick("coordinator_address", coordinator_address, "JAX_COORDINATOR_ADDRESS",
                 slurm_coordinator)
  count = pick("num_processes", num_processes, "JAX_NUM_PROCESSES", slurm_count)
  index = pick("process_id", process_id, "JAX_PROCESS_ID", slurm_id)
  if count is not None:
    count = _int(str(count), sources["num_processes"])
  if index is not None:
    index = _int(str(index), sources["process_id"])
  source = ", ".join(f"{k} from {v}" for k, v in sources.items())

  if address is None and count is None and index is None:
    return Plan("cloud_tpu", source="Cloud TPU metadata") if on_cloud_tpu else Plan("single")
  if count == 1 and index in (None, 0):
    return Plan("single", source=source)
  missing = [k for k, v in (("coordinator_address", address), ("num_processes", count),
                            ("process_id", index)) if v is None]
  if missing:
    hints = {"coordinator_address": "--coordinator_address=HOST:PORT or "
                                    "JAX_COORDINATOR_ADDRESS",
             "num_processes": "--num_processes=N or JAX_NUM_PROCESSES",
             "process_id": "--process_id=I or JAX_PROCESS_ID"}
    raise ValueError(f"multi-process training needs a coordinator address, a process count "
                     f"and a process id; got {source}, missing {', '.join(missing)}: set "
                     + "; ".join(hints[k] for k in missing))
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_id={index} is not in [0, num_processes={count}) ({source})")
  if ":" not in address:
    raise ValueError(f"coordinator address {address!r} ({sources['coordinator_address']}) "
                     "must be HOST:PORT, the same on every process")
  return Plan("explicit", address, count, index, source)


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (JAX sets this when it finds libtpu and TPU chips at import)."""
  try:
    from jax._src import cloud_tpu_init
  except ImportError:  # a JAX without it: detect nothing, flags and environment still work
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


_JOINED: Plan | None = None  # the plan carried out by this process's first `initialize`


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
  """Joins the multi-process run (or stays single); call before anything touches a device.

  Arguments left None (the commands pass their flags) come from the environment.
  A process joins once: later calls (several entry points in one program) return the plan
  that was carried out.

  Returns:
    The plan that was carried out.
  """
  import jax  # here, not at the top: data_pipelines.prepare plans without JAX

  global _JOINED
  if _JOINED is not None:
    return _JOINED
  p = plan(coordinator_address, num_processes, process_id, on_cloud_tpu=on_cloud_tpu_vm())
  _JOINED = p
  if p.mode == "single":
    return p
  if ("JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ
      and hasattr(jax.config, "jax_cpu_collectives_implementation")
      and jax.config.jax_cpu_collectives_implementation is None):
    # Older JAX had no CPU collectives by default: a multi-process CPU run needs Gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if p.mode == "cloud_tpu":
    jax.distributed.initialize()
  else:
    # All three are known: JAX's own cluster detection would only second-guess them (under
    # Slurm it would also hide all but one local GPU per process).
    jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id,
                               cluster_detection_method="deactivate")
  log.info("process %d of %d (%s; %s), %d local / %d global devices", jax.process_index(),
           jax.process_count(), p.mode, p.source, jax.local_device_count(),
           jax.device_count())
  return p


def is_main_process() -> bool:
  """True on the process that writes results and prints them (process 0)."""
  import jax

  return jax.process_index() == 0


def quiet_other_processes() -> None:
  """Process 0 tells the story; the others speak up only for warnings and errors."""
  import jax

  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
