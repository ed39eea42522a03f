"""SLURM's environment -> the `jax.distributed` settings of one process.

`srun` starts every task with SLURM_JOB_ID, SLURM_STEP_NODELIST,
SLURM_STEP_NUM_NODES, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID set. The
values here follow JAX's own SLURM detection (jax/_src/clusters/
slurm_cluster.py): the coordinator is the step's first node, on port
JAX_COORDINATOR_PORT or else SLURM_JOB_ID % 4096 + 61440 (so a requeued job,
which keeps its id, keeps its port). Unlike JAX's detection, one task per
node sees all of the node's GPUs (JAX's would give it only GPU 0): with more
tasks than nodes each task takes GPU SLURM_LOCALID, unless SLURM already bound
one GPU to the task (CUDA_VISIBLE_DEVICES naming one device).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from aapt_jax.parallel import DistributedConfig

JOB_ID, NODE_LIST, NUM_NODES = "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES"
NUM_TASKS, TASK_ID, LOCAL_TASK_ID = "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"
PORT_OVERRIDE = "JAX_COORDINATOR_PORT"
FIRST_PORT, NUM_PORTS = 65536 - 4096, 4096  # JAX's ephemeral range [61440, 65535]
LAUNCH_FIX = ("start one `srun python launch/train.py ...` per job step (the generated "
              "sbatch script does: launch/cluster/slurm.py), or pass "
              "--config.distributed.from_slurm=False to ignore SLURM's environment")


def first_host(node_list: str) -> str:
  """The first hostname of a SLURM node list: "gpu-[003-007,9],cpu1" ->
  "gpu-003", "node7,node8" -> "node7", "localhost" -> "localhost"."""
  match = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", node_list.strip())
  host = match.group(1) + (match.group(2) or "")
  if not host:
    raise ValueError(f"{NODE_LIST}={node_list!r} names no host; {LAUNCH_FIX}")
  return host


def _int(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ[name])
  except ValueError:
    raise ValueError(f"{name}={environ[name]!r} is not an integer; {LAUNCH_FIX}") from None


def distributed_config(environ: Mapping[str, str],
                       heartbeat_timeout_s: int | None = None) -> DistributedConfig | None:
  """The `DistributedConfig` of this task of a SLURM job step with several
  tasks; None outside SLURM or for a single task (nothing to initialise).

  ValueError when the environment is half there: a job with several tasks
  but no job step (python started in the batch script without srun), or a
  step that lacks one of the variables above or has inconsistent values.
  """
  if JOB_ID not in environ:
    return None
  if NODE_LIST not in environ:  # the batch script itself (or salloc's shell), not a step
    if NUM_TASKS in environ and _int(environ, NUM_TASKS) > 1:
      raise ValueError(f"this SLURM job has {environ[NUM_TASKS]} tasks but {NODE_LIST} is "
                       f"not set: this process runs outside a job step; {LAUNCH_FIX}")
    return None
  missing = [v for v in (NUM_TASKS, TASK_ID, LOCAL_TASK_ID) if v not in environ]
  if missing:
    raise ValueError(f"a SLURM job step without {', '.join(missing)}; {LAUNCH_FIX}")
  num_tasks, task_id, local_id = (_int(environ, v) for v in (NUM_TASKS, TASK_ID, LOCAL_TASK_ID))
  if num_tasks == 1:
    return None
  if not 0 <= task_id < num_tasks:
    raise ValueError(f"{TASK_ID}={task_id} is not in [0, {NUM_TASKS}={num_tasks}); {LAUNCH_FIX}")
  num_nodes = _int(environ, NUM_NODES) if NUM_NODES in environ else 1
  if not 1 <= num_nodes <= num_tasks:
    raise ValueError(f"{NUM_NODES}={num_nodes} must be in [1, {NUM_TASKS}={num_tasks}]; "
                     f"{LAUNCH_FIX}")
  if PORT_OVERRIDE in environ:
    port = _int(environ, PORT_OVERRIDE)
  else:
    port = FIRST_PORT + _int(environ, JOB_ID) % NUM_PORTS
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  one_device_per_task = num_tasks > num_nodes and len(visible) != 1
  return DistributedConfig(
      coordinator_address=f"{first_host(environ[NODE_LIST])}:{port}",
      num_processes=num_tasks, process_id=task_id,
      local_device_ids=(local_id,) if one_device_per_task else None,
      heartbeat_timeout_s=heartbeat_timeout_s)
