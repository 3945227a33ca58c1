"""Joins this process to a multi-host JAX job, before anything else touches JAX.

Where the job's shape comes from, first match wins:

- flags `--coordinator_address`, `--num_processes`, `--process_id` of `train.py`;
- environment variables `JAX_COORDINATOR_ADDRESS` (read by JAX itself), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (read here; `launch/local.py` and the Kubernetes manifest set all three);
- JAX's own cluster detection: Cloud TPU VMs and GKE TPU pods (`TPU_WORKER_HOSTNAMES` or the
  metadata server), SLURM (`srun` sets `SLURM_*`), Open MPI (`mpirun` sets `OMPI_*`).

`--distributed=auto` (the default) joins a job only when one of those says there is more than one
process, so a plain `python train.py` never waits for a coordinator. `on` always joins, letting JAX
detect the rest: use it on a TPU pod slice, whose workers learn the job from the metadata server.

A dead host must end the job, not hang it. `initialization_timeout` bounds the wait for every process
to connect; the coordinator declares a process dead after `heartbeat_timeout` seconds without a
heartbeat and then fails every other process, whose collectives would otherwise wait forever.
"""

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

MODES = ('auto', 'on', 'off')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return None if value in (None, '') else int(value)


def cluster_in_environment() -> str | None:
  """The kind of multi-process job the environment describes, or None for a single process."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_PROCID' in os.environ:
    return 'SLURM'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_PROCESS_ADDRESSES') or ''
  if len([h for h in hosts.split(',') if h]) > 1:
    return 'TPU pod'
  return None


def initialize(*, mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               initialization_timeout: int = 300, heartbeat_timeout: int = 100) -> bool:
  """Calls `jax.distributed.initialize` when the flags or the environment describe a multi-process
  job (see the module docstring); returns whether it did."""
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: expected one of {MODES}')
  num_processes = num_processes if num_processes is not None else _env_int('JAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _env_int('JAX_PROCESS_ID')
  explicit = coordinator_address is not None or num_processes not in (None, 1)
  if mode == 'off' or (mode == 'auto' and not explicit and cluster_in_environment() is None):
    return False
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
      initialization_timeout=initialization_timeout, heartbeat_timeout_seconds=heartbeat_timeout)
  return True


# ----------------------------------------------------------------------------- host-side exchanges
# Collectives: every process must call them, in the same order.

def _padded(data: bytes, length: int) -> np.ndarray:
  out = np.zeros(length, np.uint8)
  out[:len(data)] = np.frombuffer(data, np.uint8)
  return out


def broadcast_bytes(data: bytes | None) -> bytes:
  """Process 0's `data` on every process (the others pass anything, None included)."""
  if jax.process_count() == 1:
    return data
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if jax.process_index() == 0 else 0)))
  mine = data if jax.process_index() == 0 else b''
  return np.asarray(multihost_utils.broadcast_one_to_all(_padded(mine, length))).tobytes()


def allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order, on every process."""
  if jax.process_count() == 1:
    return [value]
  encoded = json.dumps(value).encode()
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(encoded))))
  rows = np.asarray(multihost_utils.process_allgather(_padded(encoded, int(lengths.max()))))
  return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths, strict=True)]
