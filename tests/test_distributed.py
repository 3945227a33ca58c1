"""When `train.py` joins a multi-process job: only when the flags or the environment say so."""

import pytest

from sparse_lm import distributed

CLUSTER_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
                'SLURM_PROCID', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES')


@pytest.fixture
def env(monkeypatch):
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


def test_single_process_environment_does_not_initialize(env):
  assert distributed.cluster_in_environment() is None
  assert distributed.initialize() is False
  env.setenv('SLURM_NTASKS', '1')  # `srun -n 1`, or an interactive allocation
  env.setenv('SLURM_PROCID', '0')
  env.setenv('TPU_WORKER_HOSTNAMES', 'localhost')  # a single-host TPU VM
  assert distributed.initialize() is False
  assert distributed.initialize(mode='off', coordinator_address='10.0.0.1:1234') is False


@pytest.mark.parametrize('name, value, kind', [
    ('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234', 'JAX_COORDINATOR_ADDRESS'),
    ('OMPI_COMM_WORLD_SIZE', '4', 'Open MPI'),
    ('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3', 'TPU pod'),
])
def test_multi_process_environments_are_recognised(env, name, value, kind):
  env.setenv(name, value)
  assert distributed.cluster_in_environment() == kind


def test_slurm_with_several_tasks_is_recognised(env):
  env.setenv('SLURM_NTASKS', '16')
  env.setenv('SLURM_PROCID', '3')
  assert distributed.cluster_in_environment() == 'SLURM'


def test_explicit_job_calls_jax_with_timeouts(env):
  calls = []
  env.setattr(distributed.jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  env.setenv('JAX_NUM_PROCESSES', '2')
  env.setenv('JAX_PROCESS_ID', '1')
  assert distributed.initialize(coordinator_address='127.0.0.1:5000', heartbeat_timeout=7)
  assert calls == [dict(coordinator_address='127.0.0.1:5000', num_processes=2, process_id=1,
                        initialization_timeout=300, heartbeat_timeout_seconds=7)]
  with pytest.raises(ValueError, match='--distributed'):
    distributed.initialize(mode='maybe')
