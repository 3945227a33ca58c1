"""Runs `train.py` on every worker of a Cloud TPU VM slice, from a machine with `gcloud`.

    python launch/tpu_pod.py --name=my-v5e --zone=us-west4-a --accelerator_type=v5litepod-16 \\
        [--queued] [--spot] [--dry_run] -- --config=configs/dense_1b.py --workdir=gs://BUCKET/run

1. reuses the TPU VM `--name` if it exists, else creates it (`--queued`: through a queued resource,
   waiting until it is ACTIVE);
2. ships this checkout (`git archive HEAD`, copied to every worker) or, with `--git_url`, clones or
   pulls it there;
3. installs it (`pip install -e '.[tpu]'`);
4. starts `train.py --distributed=on` detached on every worker (JAX finds the other workers through
   the TPU metadata server), then streams worker 0's log until training ends;
5. Ctrl-C sends SIGTERM to `train.py` on every worker, which checkpoints and exits (a preemption);
   `--delete` removes the TPU VM (or queued resource) afterwards.

`--workdir` must be on storage every worker sees (a `gs://` bucket): each worker writes its shards of
every checkpoint there. `--dry_run` prints the gcloud commands instead of running them.
"""

import argparse
import shlex
import subprocess
import sys
import time

REMOTE_DIR = '~/sparse_lm'
LOG = '~/train.log'
PID = '~/train.pid'


class Gcloud:
  """The gcloud command lines, for one TPU VM."""

  def __init__(self, args):
    self.args = args
    self.where = [f'--zone={args.zone}', *([f'--project={args.project}'] if args.project else [])]

  def tpu_vm(self, *words) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', *words]

  def describe(self) -> list[str]:
    if self.args.queued:
      return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', self.args.name, *self.where,
              '--format=value(state.state)']
    return self.tpu_vm('describe', self.args.name, *self.where, '--format=value(state)')

  def create(self) -> list[str]:
    a = self.args
    spot = ['--spot'] if a.spot else []
    if a.queued:
      return ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', a.name, f'--node-id={a.name}',
              *self.where, f'--accelerator-type={a.accelerator_type}',
              f'--runtime-version={a.runtime_version}', *spot]
    return self.tpu_vm('create', a.name, *self.where, f'--accelerator-type={a.accelerator_type}',
                       f'--version={a.runtime_version}', *spot)

  def delete(self) -> list[str]:
    if self.args.queued:
      return ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', self.args.name, *self.where,
              '--force', '--quiet']
    return self.tpu_vm('delete', self.args.name, *self.where, '--quiet')

  def ssh(self, command: str, worker: str = 'all') -> list[str]:
    return self.tpu_vm('ssh', self.args.name, *self.where, f'--worker={worker}', f'--command={command}')

  def scp(self, local: str, remote: str) -> list[str]:
    return self.tpu_vm('scp', local, f'{self.args.name}:{remote}', *self.where, '--worker=all')


def code_steps(g: Gcloud, args) -> list[list[str]]:
  if args.git_url:
    return [g.ssh(f'git clone {shlex.quote(args.git_url)} {REMOTE_DIR} 2>/dev/null || '
                  f'git -C {REMOTE_DIR} pull --ff-only')]
  archive = f'/tmp/{args.name}-code.tar.gz'
  return [['git', 'archive', '--format=tar.gz', f'--output={archive}', 'HEAD'],
          g.scp(archive, '/tmp/sparse_lm.tar.gz'),
          g.ssh(f'rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && '
                f'tar -xzf /tmp/sparse_lm.tar.gz -C {REMOTE_DIR}')]


def train_steps(g: Gcloud, train_flags: list[str]) -> tuple[list[str], list[str], list[str]]:
  """Start on every worker (detached, so a dropped ssh does not stop training), stream worker 0's log
  until its train.py exits, and stop with SIGTERM."""
  flags = ' '.join(shlex.quote(f) for f in ['--distributed=on', *train_flags])
  start = g.ssh(f'cd {REMOTE_DIR} && nohup python3 train.py {flags} > {LOG} 2>&1 & echo $! > {PID}')
  stream = g.ssh(f'tail --pid=$(cat {PID}) -n +1 -F {LOG}', worker='0')
  stop = g.ssh(f'kill -TERM $(cat {PID}) 2>/dev/null; true')
  return start, stream, stop


def commands(args, train_flags: list[str]) -> list[tuple[str, list[str]]]:
  """Every command of a launch, in order, each with what it is for."""
  g = Gcloud(args)
  start, stream, stop = train_steps(g, train_flags)
  steps = [('reuse the TPU VM if this succeeds', g.describe()),
           ('else create it', g.create()),
           *[('ship the code', c) for c in code_steps(g, args)],
           ('install', g.ssh(f"cd {REMOTE_DIR} && pip install -q -e '.[tpu]'")),
           ('start train.py on every worker', start),
           ("stream worker 0's log", stream),
           ('on Ctrl-C: SIGTERM train.py everywhere (checkpoint, exit)', stop)]
  if args.delete:
    steps.append(('delete the TPU VM', g.delete()))
  return steps


def run(args, train_flags: list[str]) -> int:
  g = Gcloud(args)
  if subprocess.run(g.describe(), capture_output=True, text=True).returncode != 0:
    subprocess.run(g.create(), check=True)
  # A queued resource, new or reused, may still be waiting for capacity: wait until it is ACTIVE.
  while args.queued and subprocess.run(g.describe(), capture_output=True,
                                       text=True).stdout.strip() != 'ACTIVE':
    time.sleep(30)
  for command in code_steps(g, args):
    subprocess.run(command, check=True)
  subprocess.run(g.ssh(f"cd {REMOTE_DIR} && pip install -q -e '.[tpu]'"), check=True)
  start, stream, stop = train_steps(g, train_flags)
  subprocess.run(start, check=True)
  try:
    code = subprocess.run(stream).returncode
  except KeyboardInterrupt:
    subprocess.run(stop)
    code = 130
  if args.delete:
    subprocess.run(g.delete(), check=True)
  return code


def parse(argv: list[str]):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   usage='%(prog)s [options] -- TRAIN_FLAGS...')
  parser.add_argument('--name', required=True, help='TPU VM (and queued resource) name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default=None, help='default: gcloud config')
  parser.add_argument('--accelerator_type', default='v5litepod-16')
  parser.add_argument('--runtime_version', default='v2-alpha-tpuv5-lite')
  parser.add_argument('--queued', action='store_true', help='create through a queued resource')
  parser.add_argument('--spot', action='store_true')
  parser.add_argument('--git_url', default=None, help='clone or pull this instead of copying HEAD')
  parser.add_argument('--delete', action='store_true', help='delete the TPU VM when training ends')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  split = argv.index('--') if '--' in argv else len(argv)
  return parser.parse_args(argv[:split]), argv[split + 1:]


def main() -> None:
  args, train_flags = parse(sys.argv[1:])
  if args.dry_run:
    for what, command in commands(args, train_flags):
      print(f'# {what}\n{shlex.join(command)}')
    return
  sys.exit(run(args, train_flags))


if __name__ == '__main__':
  main()
