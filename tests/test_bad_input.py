"""Every command answers bad input with one line naming the flag, file or key, what is wrong and what is
allowed, and a non-zero exit; never a traceback. A new command or case is one row of a table.

(`train.py`'s config checks, `scaling fit`'s runs files and `compile`'s targets have their own tables in
test_checks.py, test_scaling.py and test_compile.py.)
"""

import re
import subprocess
import sys

import pytest

from sparse_lm import scaling, startup
from tests.conftest import CORPUS_FILE, REPO

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

# The mistakes a person makes at the command line of train.py (and the commands sharing its flags):
# (arguments, files written under {tmp} first, the last line of stderr must match). Each is one line,
# exit status non-zero, and nothing is written.
CONFIG_FILE = 'def get_config():\n  from sparse_lm.config import base_config\n  return base_config()\n'
MISTAKES = [
    (['train.py', '--workdir={tmp}/run', '--config.train.stepz=10'], {},
     r"^train: --config.train.stepz: the config has no key 'train.stepz'; "
     r"did you mean --config.train.steps\?$"),
    (['-m', 'sparse_lm.flops', '--config.model.atention=nsa'], {},
     r'^flops: --config.model.atention: .* did you mean --config.model.attention\?$'),
    (['train.py', '--workdir={tmp}/run', '--config=configs/nsa_10.py'], {},
     r'^train: --config=configs/nsa_10.py: no such file in .*; did you mean configs/nsa_10m.py'),
    (['train.py', '--workdir={tmp}/run', '--config={tmp}/mine.py', '--config.train.stepz=1'],
     {'mine.py': CONFIG_FILE}, r"^train: --config.train.stepz: the config has no key"),
    (['train.py', '--workdir={tmp}/run', '--config.train.steps=abc'], {},
     r"^train: flag --config.train.steps=abc: invalid literal for int\(\) .*\(--helpfull lists every "
     r"flag\)$"),
    (['train.py', '--workdirr={tmp}/run'], {},
     r"^train: Unknown command line flag 'workdirr'. Did you mean: workdir"),
    (['train.py', '--workdir={tmp}/notes.txt'], {'notes.txt': 'mine'},
     r'^config error: --workdir=.*/notes.txt is a file; a run directory is a new or empty directory'),
    (['train.py', '--workdir={tmp}/home'], {'home/thesis.tex': 'mine', 'home/data.csv': '1,2'},
     r'^config error: --workdir=.*/home is not a run directory \(no config.json, and it holds data.csv, '
     r'thesis.tex\); use a new or empty directory$'),
    (['train.py', '--workdir={tmp}/run'], {'run/config.json': '{"model": '},
     r'^config error: --workdir=.*/run: its config.json cannot be read \(.*\); it is not a run'),
    (['-m', 'sparse_lm.evaluate', '--workdir={tmp}/notes.txt'], {'notes.txt': 'mine'},
     r'^evaluate: --workdir=.*/notes.txt: no run there'),
    (['-m', 'sparse_lm.sample', '--workdir={tmp}/run'], {'run/config.json': '[1, 2]'},
     r'^sample: --workdir=.*/run: its config.json is not a run config'),
    (['-m', 'sparse_lm.prepare', '--source=stdlib', '--out={tmp}/out'], {'out/thesis.tex': 'mine'},
     r'^prepare: --out=.*/out holds files that are not a prepared corpus \(thesis.tex\)'),
    (['-m', 'sparse_lm.prepare', '--source=stdlib', '--tokenizer=bpe:100', '--out={tmp}/out'], {},
     r'^prepare: --tokenizer=.*VOCAB must be above 257'),
    (['-m', 'sparse_lm.prepare', '--out={tmp}/out'], {}, r'^prepare: flag --source=None: Flag --source must '
     'have a value'),
    (['-m', 'sparse_lm.prepare', '--source=stdlib', '--tokenizer=hf:{tmp}/none.json', '--out={tmp}/out'], {},
     r"^prepare: data.tokenizer='hf:.*none.json': no such file"),
    (['train.py', '--workdir={tmp}/run', '--config.data.source=tokens:{tmp}'], {},
     r"^config error: data.source='tokens:.*': .* has no manifest.json"),
    (['-m', 'sparse_lm.sample', '--workdir={tmp}/run', '--max_new_tokens=many'], {},
     r"^sample: flag --max_new_tokens=many: invalid literal for int\(\)"),
]


def _name(x):
  return ' '.join(x)[:60] if isinstance(x, list) else ''


@pytest.mark.parametrize('args,pattern', COMMANDS, ids=_name)
def test_command_refuses_bad_input_in_one_line(tmp_path, args, pattern):
  args = [a.replace('{tmp}', str(tmp_path)) for a in args]
  run = _run(args, tmp_path)
  last = run.stderr.strip().splitlines()[-1]
  assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert re.search(pattern, last), last


@pytest.mark.parametrize('args,files,pattern', MISTAKES, ids=_name)
def test_command_line_mistakes_are_one_line_and_write_nothing(tmp_path, args, files, pattern):
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  before = sorted(tmp_path.rglob('*'))
  run = _run([a.replace('{tmp}', str(tmp_path)) for a in args], tmp_path)
  lines = run.stderr.strip().splitlines()
  assert run.returncode != 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
  assert re.search(pattern, lines[-1]), lines[-1]
  assert sorted(tmp_path.rglob('*')) == before


def test_commands_run_from_any_directory(tmp_path):
  """Config paths are found relative to the repository too, so train.py and the modules run from any
  working directory."""
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  flops = _run(['-m', 'sparse_lm.flops', '--config=configs/dense_1m.py'], tmp_path, cwd=elsewhere)
  assert flops.returncode == 0 and '"flops_per_token"' in flops.stdout, flops.stderr[-2000:]
  train = _run([str(REPO / 'train.py'), '--workdir=run', '--config=configs/dense_1m.py',
                '--config.train.steps=2', '--config.train.eval_batches=1'], tmp_path, cwd=elsewhere)
  assert train.returncode == 0, train.stderr[-2000:]
  assert re.search(r'train: finished step 2 of 2; .* newest checkpoint \S+/elsewhere/run/checkpoints/2$',
                   train.stderr.strip().splitlines()[-1]), train.stderr[-2000:]


def test_no_plugin_noise_on_a_cpu_only_machine(tmp_path):
  """With the compile tier's CUDA plugin and libtpu installed and no JAX_PLATFORMS set, a command on a
  machine without a GPU or TPU prints nothing but its own output (it used to print ~30 lines of plugin
  errors, and 6 with JAX_PLATFORMS=cpu)."""
  if startup.has_accelerator():
    pytest.skip('an accelerator is attached: the platform is JAX\'s to choose')
  flops = _run(['-m', 'sparse_lm.flops', '--config=configs/dense_1m.py'], tmp_path)
  assert flops.returncode == 0 and flops.stderr == '', flops.stderr


def _run(args, home, cwd=REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                        env={'PATH': '/usr/bin:/bin', 'HOME': str(home)})


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
    (['fit', str(CORPUS_FILE)], r'sparse_lm_test_corpus_\d+.txt:1: not JSON'),
]


@pytest.mark.parametrize('args,pattern', SCALING, ids=_name)
def test_scaling_refuses_bad_input_in_one_line(tmp_path, capsys, args, pattern):
  with pytest.raises(SystemExit) as exit_:
    scaling.main([a.replace('{tmp}', str(tmp_path)) for a in args])
  message = str(exit_.value.code)  # printed to stderr by Python, with exit status 1
  assert message.startswith(f'scaling {args[0]}: ') and '\n' not in message, message
  assert re.search(pattern, message), message
  assert not capsys.readouterr().out
