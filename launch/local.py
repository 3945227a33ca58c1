"""Runs a real multi-process JAX job on this one machine, the test bed for multi-host code.

    python launch/local.py --num_processes=2 --devices_per_process=2 -- --config.mesh.fsdp=4

starts `train.py` (or `--script`) once per process with the flags after `--`. Each process gets K fake
CPU devices and joins the job through the coordinator on 127.0.0.1, exactly as a pod's hosts do
(`sparse_lm/distributed.py`); JAX's CPU backend runs the cross-process collectives over gloo. Every
output line is prefixed with its process's rank.

SIGTERM or SIGINT (Ctrl-C) to this launcher sends SIGTERM to every process, which is a preemption: they
agree on a step, checkpoint and exit. When any process fails, the others are killed and the launcher
exits with that process's code.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(rank: int, num_processes: int, devices_per_process: int, port: int) -> dict[str, str]:
  return {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
      'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
      'JAX_NUM_PROCESSES': str(num_processes),
      'JAX_PROCESS_ID': str(rank),
      'PYTHONUNBUFFERED': '1',
  }


def _pump(rank: int, stream, lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f'[{rank}] {line}')
      sys.stdout.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int) -> int:
  port = free_port()
  lock = threading.Lock()
  children, pumps = [], []
  for rank in range(num_processes):
    # A session of its own: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
    child = subprocess.Popen(command, env=process_env(rank, num_processes, devices_per_process, port),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    print(f'local.py: process {rank} is pid {child.pid}', file=sys.stderr, flush=True)
    children.append(child)
    pumps.append(threading.Thread(target=_pump, args=(rank, child.stdout, lock), daemon=True))
    pumps[-1].start()

  def forward(signum, frame):
    del signum, frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  failed = None
  while failed is None and any(child.poll() is None for child in children):
    failed = next((c for c in children if c.poll() not in (None, 0)), None)
    time.sleep(0.1)
  failed = failed or next((c for c in children if c.returncode), None)
  if failed is not None:
    rank = children.index(failed)
    print(f'local.py: process {rank} exited with {failed.returncode}; stopping the others',
          file=sys.stderr, flush=True)
    for child in children:
      if child.poll() is None:
        child.kill()
  for child in children:
    child.wait()
  for pump in pumps:
    pump.join(timeout=5)
  return 0 if failed is None else (failed.returncode if failed.returncode > 0 else 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   usage='%(prog)s [options] -- TRAIN_FLAGS...')
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--script', default=os.path.join(REPO, 'train.py'),
                      help='the program every process runs')
  argv = sys.argv[1:]
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  for name in ('num_processes', 'devices_per_process'):
    if getattr(args, name) < 1:
      parser.error(f'--{name}={getattr(args, name)} must be at least 1')
  if not os.path.isfile(args.script):
    parser.error(f'--script={args.script} is not a file')
  command = [sys.executable, args.script, *argv[split + 1:]]
  sys.exit(launch(command, args.num_processes, args.devices_per_process))


if __name__ == '__main__':
  main()
