"""Every command answers bad input with one line naming the flag, file or key, what is wrong and what is
allowed, and a non-zero exit; never a traceback. A new command or case is one row of a table.

(`train.py`'s config checks, `scaling fit`'s runs files and `compile`'s targets have their own tables in
test_checks.py, test_scaling.py and test_compile.py.)
"""

import re
import subprocess
import sys

import pytest

from sparse_lm import scaling
from tests.conftest import REPO, SHAKESPEARE

# Commands run as a user would (absl flags are process-wide, so each runs in its own process):
# (arguments, the last line of stderr must match).
COMMANDS = [
    (['train.py', '--workdir={tmp}/run', '--config.data.source=tfds:no_such_dataset_xyz'],
     r"^config error: data.source='tfds:no_such_dataset_xyz': TFDS has no such dataset"),
    (['-m', 'sparse_lm.sample', '--workdir={tmp}/none'], r'^sample: --workdir=.*/none: no run there'),
    (['-m', 'sparse_lm.sample', '--workdir={tmp}/none', '--temperature=-1'],
     r'^sample: --temperature=-1.0 must be at least 0'),
    (['-m', 'sparse_lm.evaluate', '--workdir={tmp}/none'], r'^evaluate: --workdir=.*/none: no run there'),
    (['-m', 'sparse_lm.evaluate', '--workdir={tmp}/none', '--seq_len=64,abc'],
     r'^evaluate: --seq_len=64,abc: expected comma-separated ints'),
    (['-m', 'sparse_lm.evaluate', '--workdir={tmp}/none', '--depths=0.5,2'],
     r'^evaluate: --depths=0.5,2: each value must be in \[0, 1.0\]'),
    (['-m', 'sparse_lm.flops', '--config=configs/dense_1m.py', '--config.model.attention=nope'],
     r"^flops: config error: model.attention='nope' is not one of"),
    ([str(REPO / 'launch' / 'local.py'), '--num_processes=0', '--', '--workdir=x'],
     r'error: --num_processes=0 must be at least 1'),
    ([str(REPO / 'launch' / 'k8s.py'), '--name=a', '--image=b', '--hosts=0'],
     r'error: --hosts=0 must be at least 1'),
]


def _name(x):
  return ' '.join(x)[:60] if isinstance(x, list) else ''


@pytest.mark.parametrize('args,pattern', COMMANDS, ids=_name)
def test_command_refuses_bad_input_in_one_line(tmp_path, args, pattern):
  args = [a.replace('{tmp}', str(tmp_path)) for a in args]
  run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path)})
  last = run.stderr.strip().splitlines()[-1]  # lines before it: the CUDA plugin's start-up log
  assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert re.search(pattern, last), last


# `python -m sparse_lm.scaling` parses its own arguments, so its rows run in this process.
SCALING = [
    (['sweep', '--budgets=1e13,abc', '--workdir_root={tmp}'],
     r'--budgets=1e13,abc: expected comma-separated'),
    (['sweep', '--budgets=-1', '--workdir_root={tmp}'], r'--budgets=-1: expected .* > 0'),
    (['sweep', '--budgets=1e13', '--workdir_root={tmp}', '--law={tmp}/missing.json'],
     r'--law=.*missing.json: not the JSON of `scaling fit`'),
    (['sweep', '--budgets=1e13', '--workdir_root={tmp}', '--variant=nope'],
     r"--variant='nope' is not one of"),
    (['sweep', '--budgets=1e13', '--workdir_root={tmp}', '--spread=0.5'], r'--spread=0.5 must be > 1'),
    (['collect', '--workdir_root={tmp}/none'], r'--workdir_root=.*/none is not a directory'),
    (['fit', '{tmp}/missing.jsonl'], r'missing.jsonl: cannot read it'),
    (['fit', str(SHAKESPEARE)], r'tinyshakespeare.txt:1: not JSON'),
]


@pytest.mark.parametrize('args,pattern', SCALING, ids=_name)
def test_scaling_refuses_bad_input_in_one_line(tmp_path, capsys, args, pattern):
  with pytest.raises(SystemExit) as exit_:
    scaling.main([a.replace('{tmp}', str(tmp_path)) for a in args])
  message = str(exit_.value.code)  # printed to stderr by Python, with exit status 1
  assert message.startswith(f'scaling {args[0]}: ') and '\n' not in message, message
  assert re.search(pattern, message), message
  assert not capsys.readouterr().out
