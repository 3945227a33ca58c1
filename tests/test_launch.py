"""The launchers, without a cloud: dry runs print the expected commands, the SLURM script parses and
calls srun as intended, and the Kubernetes manifest has what a multi-host Job needs."""

import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

K8S_VERSION = '1.33'  # a GKE release; the schemas ship with kubernetes-validate (no network)
LAUNCH = REPO / 'launch'


def _run(*command, **kwargs) -> str:
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, **kwargs).stdout


def test_tpu_pod_dry_run_prints_each_gcloud_step():
  out = _run(sys.executable, str(LAUNCH / 'tpu_pod.py'), '--dry_run', '--name=pod', '--zone=us-west4-a',
             '--accelerator_type=v5litepod-16', '--queued', '--', '--config=configs/dense_1b.py',
             '--workdir=gs://bucket/run')
  commands = [shlex.split(line) for line in out.splitlines() if not line.startswith('#')]
  assert commands[0][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']
  create = commands[1]
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod']
  assert '--accelerator-type=v5litepod-16' in create and '--zone=us-west4-a' in create
  ssh = [c for c in commands if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  start = next(c for c in ssh if 'train.py' in c[-1] and 'nohup' in c[-1])
  assert '--worker=all' in start
  assert ('train.py --distributed=on --config=configs/dense_1b.py --workdir=gs://bucket/run'
          in start[-1])
  assert any('--worker=0' in c and 'tail' in c[-1] for c in ssh)  # worker 0's log is streamed
  assert any('kill -TERM' in c[-1] and '--worker=all' in c for c in ssh)  # and stopped with SIGTERM
  assert any("pip install" in c[-1] for c in ssh)


def test_tpu_pod_dry_run_with_git_url_pulls_instead_of_copying():
  out = _run(sys.executable, str(LAUNCH / 'tpu_pod.py'), '--dry_run', '--name=pod', '--zone=z',
             '--git_url=https://example.com/sparse_lm.git', '--delete')
  assert 'git archive' not in out and 'git clone https://example.com/sparse_lm.git' in out
  assert 'tpu-vm delete pod' in out


def test_slurm_script_parses_and_runs_train_on_every_task(tmp_path):
  script = LAUNCH / 'slurm.sbatch'
  subprocess.run(['bash', '-n', str(script)], check=True)
  directives = [line for line in script.read_text().splitlines() if line.startswith('#SBATCH')]
  assert '#SBATCH --signal=B:USR1@180' in directives
  # A stand-in srun records its arguments and the environment the job sets up.
  fake = tmp_path / 'srun'
  fake.write_text('#!/bin/bash\necho "ARGS $*"\necho "LOCAL_IDS ${JAX_LOCAL_DEVICE_IDS:-unset}"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_SUBMIT_DIR': str(REPO)}
  out = _run('bash', str(script), '--config=configs/dense_1b.py', '--workdir=/shared/run', env=env)
  assert ('ARGS --kill-on-bad-exit=1 --label python train.py --distributed=on '
          '--config=configs/dense_1b.py --workdir=/shared/run') in out
  assert 'LOCAL_IDS unset' in out  # one task per GPU: JAX picks SLURM_LOCALID
  env.update(SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_PER_NODE='h100:4')
  assert 'LOCAL_IDS 0,1,2,3' in _run('bash', str(script), env=env)


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path):
  """SLURM's USR1 before the time limit: the tasks get SIGTERM (train.py's checkpoint-and-exit), and
  only once they have exited is the job requeued."""
  log = tmp_path / 'log'
  (tmp_path / 'srun').write_text(  # a task that checkpoints on SIGTERM, taking a moment
      f'#!/bin/bash\ntrap \'sleep 0.5; echo "task saved and exited" >> {log}; exit 0\' TERM\n'
      f'echo started >> {log}\nwhile true; do sleep 0.1; done\n')
  (tmp_path / 'scontrol').write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
  for name in ('srun', 'scontrol'):
    (tmp_path / name).chmod(0o755)
  env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_SUBMIT_DIR': str(REPO),
         'SLURM_JOB_ID': '4242'}
  job = subprocess.Popen(['bash', str(LAUNCH / 'slurm.sbatch'), '--workdir=/shared/run'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 30
  while not (log.exists() and 'started' in log.read_text()):
    assert time.monotonic() < deadline and job.poll() is None, job.stdout.read()
    time.sleep(0.05)
  job.send_signal(signal.SIGUSR1)
  job.wait(timeout=30)
  assert log.read_text().splitlines() == ['started', 'task saved and exited', 'scontrol requeue 4242']


def test_slurm_job_exits_with_the_tasks_status_and_requeues_only_at_the_time_limit(tmp_path):
  log = tmp_path / 'log'
  (tmp_path / 'srun').write_text('#!/bin/bash\nexit 3\n')
  (tmp_path / 'scontrol').write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
  for name in ('srun', 'scontrol'):
    (tmp_path / name).chmod(0o755)
  env = {**os.environ, 'PATH': f'{tmp_path}:{os.environ["PATH"]}', 'SLURM_SUBMIT_DIR': str(REPO),
         'SLURM_JOB_ID': '4242'}
  job = subprocess.run(['bash', str(LAUNCH / 'slurm.sbatch')], env=env, capture_output=True, timeout=30)
  assert job.returncode == 3 and not log.exists()


def _manifest(*flags):
  """The rendered Service and Job, each validated against Kubernetes' own OpenAPI schema (strict: an
  unknown or misspelt field fails), as `kubectl apply --dry-run` would."""
  out = _run(sys.executable, str(LAUNCH / 'k8s.py'), '--name=dense-1b', '--image=registry/sparse_lm:1',
             '--hosts=4', *flags, '--', '--config=configs/dense_1b.py', '--workdir=gs://bucket/run')
  service, job = yaml.safe_load_all(out)
  for manifest in (service, job):
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
  return service, job


def test_k8s_schema_check_rejects_an_unknown_field():
  _, job = _manifest('--accelerator=gpu')
  job['spec']['completionz'] = 4
  with pytest.raises(kubernetes_validate.ValidationError, match='completionz'):
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_k8s_manifest_is_an_indexed_job_with_a_coordinator():
  service, job = _manifest('--accelerator=tpu', '--chips_per_host=4', '--tpu_topology=4x4')
  assert service['kind'] == 'Service' and service['spec']['clusterIP'] == 'None'
  assert job['apiVersion'] == 'batch/v1' and job['kind'] == 'Job'
  spec = job['spec']
  assert spec['completionMode'] == 'Indexed' and spec['completions'] == spec['parallelism'] == 4
  pod = spec['template']['spec']
  assert pod['subdomain'] == service['metadata']['name']
  assert service['spec']['selector'].items() <= spec['template']['metadata']['labels'].items()
  assert pod['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '4x4'
  container, = pod['containers']
  assert container['command'][:3] == ['python', 'train.py', '--distributed=on']
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  env = {e['name']: e for e in container['env']}
  assert env['JAX_COORDINATOR_ADDRESS']['value'].startswith('dense-1b-0.dense-1b:')
  assert env['JAX_NUM_PROCESSES']['value'] == '4'
  assert 'job-completion-index' in env['JAX_PROCESS_ID']['valueFrom']['fieldRef']['fieldPath']


def test_k8s_manifest_for_gpus():
  _, job = _manifest('--accelerator=gpu', '--chips_per_host=8')
  pod = job['spec']['template']['spec']
  assert pod['containers'][0]['resources']['limits'] == {'nvidia.com/gpu': 8}
  assert pod['nodeSelector'] == {}
