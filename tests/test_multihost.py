"""Real multi-process JAX jobs on this machine through `launch/local.py`: several processes give the
numbers one gives, checkpoints move between process counts and meshes, and SIGTERM on one host stops
all of them at one checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch import local as launch_local
from tests.conftest import REPO, TINY_FLAGS, resumed_step, run_train, train_losses, train_steps_logged

# 40 steps, a checkpoint every 10 (the newest three kept), evaluation only at the end.
FLAGS = (*TINY_FLAGS, '--config.train.steps=40', '--config.train.eval_every=40')


def local_command(workdir, processes: int, devices: int, *extra) -> list[str]:
  return [sys.executable, str(REPO / 'launch' / 'local.py'), f'--num_processes={processes}',
          f'--devices_per_process={devices}', '--', f'--workdir={workdir}', *FLAGS, *extra]


def run_local(workdir, processes: int, devices: int, *extra) -> subprocess.CompletedProcess:
  result = subprocess.run(local_command(workdir, processes, devices, *extra), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


def assert_same_losses(run, reference, steps, tol=2e-4):
  got, want = train_losses(run), train_losses(reference)
  for step in steps:
    assert got[step] == pytest.approx(want[step], rel=tol, abs=tol), step


def resume_from(reference, workdir, step) -> None:
  """A copy of `reference` as it was when the checkpoint of `step` was its newest (its metrics up to
  `step`)."""
  shutil.copytree(reference, workdir, dirs_exist_ok=True)
  for path in (workdir / 'checkpoints').iterdir():
    if path.name.isdigit() and int(path.name) > step:
      shutil.rmtree(path)
  metrics = workdir / 'metrics.jsonl'
  kept = [line for line in metrics.read_text().splitlines() if json.loads(line)['step'] <= step]
  metrics.write_text(''.join(line + '\n' for line in kept))


@pytest.fixture(scope='module')
def two_hosts(tmp_path_factory):
  """2 processes x 2 devices, fsdp over all 4: the run the others compare against."""
  workdir = tmp_path_factory.mktemp('two_hosts')
  result = run_local(workdir, 2, 2, '--config.mesh.fsdp=4')
  return workdir, result


def test_two_processes_train_and_only_process_zero_writes(two_hosts):
  workdir, result = two_hosts
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 41))
  assert losses[40] < losses[1] - 1.0
  # One metrics line per step: process 1 computes the same numbers but never writes them.
  assert len([line for line in (workdir / 'metrics.jsonl').read_text().splitlines()
              if '"loss"' in line]) == 40
  assert '[1] ' in result.stdout and '[0] ' in result.stdout


@pytest.fixture(scope='module')
def one_host(tmp_path_factory):
  """The same run on 1 process x 4 devices."""
  workdir = tmp_path_factory.mktemp('one_host')
  run_train(workdir, *FLAGS[len(TINY_FLAGS):], '--config.mesh.fsdp=4', devices=4)
  return workdir


def test_two_processes_match_one_process_with_four_devices(two_hosts, one_host):
  assert_same_losses(one_host, two_hosts[0], range(1, 41))


def test_hybrid_mesh_across_hosts_matches(two_hosts, tmp_path):
  """fsdp split 2 ways over the hosts and 2 ways within each: the same numbers."""
  run_local(tmp_path, 2, 2, '--config.mesh.fsdp=4', '--config.mesh.dcn_fsdp=2')
  assert_same_losses(tmp_path, two_hosts[0], range(1, 41))


def test_restore_on_another_mesh_continues_exactly(two_hosts, tmp_path):
  """Saved with 2 x 2 devices and fsdp=4, resumed with 2 x 1 devices and fsdp=2 (Orbax reshards)."""
  resume_from(two_hosts[0], tmp_path, 20)
  assert resumed_step(run_local(tmp_path, 2, 1, '--config.mesh.fsdp=2').stdout) == 20
  assert_same_losses(tmp_path, two_hosts[0], range(21, 41))


def test_restore_on_one_process_continues(two_hosts, tmp_path):
  """Saved by 2 processes x 2 devices, resumed by 1 process x 4 devices: parameters, optimizer state
  and every data shard's position move onto the new topology, and the losses continue as in the
  uninterrupted run."""
  resume_from(two_hosts[0], tmp_path, 20)
  resumed = run_train(tmp_path, *FLAGS[len(TINY_FLAGS):], '--config.mesh.fsdp=4', devices=4)
  assert resumed_step(resumed.stderr) == 20
  assert sorted(train_losses(tmp_path)) == list(range(1, 41))
  assert_same_losses(tmp_path, two_hosts[0], range(21, 41))


def test_one_process_checkpoint_resumes_on_two(one_host, tmp_path):
  """The reverse: saved by 1 process x 4 devices, resumed by 2 processes x 2 devices."""
  resume_from(one_host, tmp_path, 20)
  assert resumed_step(run_local(tmp_path, 2, 2, '--config.mesh.fsdp=4').stdout) == 20
  assert_same_losses(tmp_path, one_host, range(21, 41))


def _wait_for(predicate, process, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, 'launcher exited early'
    if predicate():
      return
    time.sleep(0.05)
  raise TimeoutError


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'ctrl_c'])
def test_stop_signal_to_one_host_checkpoints_all_and_rerun_resumes(two_hosts, tmp_path, signum):
  """Preemption or a Ctrl-C reaching one host only: every host saves the same step and exits 0."""
  log = tmp_path / 'launcher.log'
  workdir = tmp_path / 'run'
  with log.open('w') as out:
    launcher = subprocess.Popen(local_command(workdir, 2, 2, '--config.mesh.fsdp=4'), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: 'process 1 is pid' in log.read_text(), launcher)
  pid = int(log.read_text().split('process 1 is pid ')[1].split()[0])
  metrics = workdir / 'metrics.jsonl'
  _wait_for(lambda: metrics.exists() and max(train_losses(workdir), default=0) >= 3, launcher)
  os.kill(pid, signum)
  assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
  stopped_at = max(train_losses(workdir))
  assert stopped_at < 40
  saved = {int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()}
  assert max(saved) == stopped_at, (saved, stopped_at)  # one agreed step, saved by both hosts
  assert resumed_step(run_local(workdir, 2, 2, '--config.mesh.fsdp=4').stdout) == stopped_at
  assert train_steps_logged(workdir) == list(range(1, 41))
  assert_same_losses(workdir, two_hosts[0], range(1, 41), tol=1e-5)


@pytest.mark.parametrize('dead', [0, 1], ids=['coordinator_dies', 'worker_dies'])
def test_a_dead_host_ends_the_job_instead_of_hanging(tmp_path, dead):
  """Two processes started as a scheduler would (no launcher to clean up after them); one is killed
  mid-training. The survivor must exit with an error naming the cause, not wait forever in a
  collective: JAX's coordination service sees the lost heartbeat (or connection) and aborts it."""
  port = launch_local.free_port()
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'{rank}.log' for rank in range(2)]
  processes = [
      subprocess.Popen([sys.executable, str(REPO / 'train.py'), f'--workdir={workdir}', *FLAGS,
                        '--config.train.steps=100000', '--config.mesh.fsdp=2', '--heartbeat_timeout=10'],
                       env=launch_local.process_env(rank, 2, 1, port), cwd=REPO, stdout=log.open('w'),
                       stderr=subprocess.STDOUT)
      for rank, log in enumerate(logs)]
  try:
    _wait_for(lambda: (workdir / 'metrics.jsonl').exists() and train_losses(workdir), processes[1 - dead])
    processes[dead].kill()
    returncode = processes[1 - dead].wait(timeout=120)
  finally:
    for process in processes:
      process.kill()
  assert returncode != 0
  assert 'another task died' in logs[1 - dead].read_text()


def test_sentencepiece_from_process_zero_feeds_both_hosts(tmp_path):
  """Process 0 trains the tokenizer, writes it and broadcasts it (`distributed.broadcast_bytes`)."""
  result = run_local(tmp_path, 2, 1, '--config.mesh.fsdp=2', '--config.data.tokenizer=sentencepiece:512',
                     '--config.train.steps=6', '--config.train.eval_every=6')
  assert sorted(train_losses(tmp_path)) == list(range(1, 7))
  assert (tmp_path / 'tokenizer.model').exists()
  assert 'Traceback' not in result.stdout
