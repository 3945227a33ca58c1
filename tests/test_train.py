"""End-to-end training through `train.py`: loss falls, sharding does not change the numbers, and a
killed or preempted run resumes exactly where an uninterrupted one would be."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sparse_lm import data, evaluate, files, rundir, tokenizer
from sparse_lm.config import base_config
from tests.conftest import (
  CORPUS_FILE,
  REPO,
  eval_lines,
  resumed_step,
  run_train,
  train_command,
  train_losses,
  train_steps_logged,
  write_bpe,
  xla_flags,
)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """One uninterrupted 30-step run that the other tests compare against."""
  workdir = tmp_path_factory.mktemp('reference')
  run_train(workdir)
  return workdir


def test_loss_falls_and_outputs_are_written(reference_run):
  losses = train_losses(reference_run)
  assert sorted(losses) == list(range(1, 31))
  assert losses[30] < losses[1] - 1.0, losses
  rows = [json.loads(line) for line in (reference_run / 'metrics.jsonl').read_text().splitlines()]
  evals = [row for row in rows if 'eval_loss' in row]
  assert [row['step'] for row in evals] == [10, 20, 30]
  assert evals[-1]['eval_loss'] < evals[0]['eval_loss']
  assert all(row['eval_bpb'] > 0 and row['causal'] is True for row in evals)
  train_rows = [row for row in rows if 'loss' in row]
  assert all(row['tokens_per_second'] > 0 and row['tflops_per_second'] > 0 for row in train_rows)
  assert all(row['learning_rate'] > 0 for row in train_rows)
  config = json.loads((reference_run / 'config.json').read_text())
  assert config['model']['vocab_size'] == 259
  assert list((reference_run / 'tensorboard').iterdir())


def test_eight_devices_fsdp_tensor_match_one_device(reference_run, tmp_path):
  run_train(tmp_path, '--config.mesh.fsdp=4', '--config.mesh.tensor=2', '--config.train.steps=30',
            devices=8)
  sharded, single = train_losses(tmp_path), train_losses(reference_run)
  assert sorted(sharded) == sorted(single)
  for step, loss in single.items():
    assert sharded[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step


def test_gradient_accumulation_matches_one_big_batch(reference_run, tmp_path):
  run_train(tmp_path, '--config.train.grad_accum_steps=2')
  accumulated, single = train_losses(tmp_path), train_losses(reference_run)
  for step in range(1, 31):
    assert accumulated[step] == pytest.approx(single[step], rel=2e-4, abs=2e-4), step


def _start(workdir, *extra):
  env = {**os.environ, 'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=1'),
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen(train_command(workdir, *extra), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, process, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, process.stderr.read()
    if (workdir / 'metrics.jsonl').exists() and max(train_losses(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise TimeoutError(f'step {step} not reached')


def _rerun_and_assert_resumed(workdir, reference_run):
  """Reruns the command: it says it starts from the newest committed checkpoint (not from step 0, which
  would log the same losses) and ends with the losses of the uninterrupted run, one line a step."""
  committed = max(int(p.parent.name) for p in (workdir / 'checkpoints').glob('*/commit_success.txt'))
  rerun = run_train(workdir)
  assert resumed_step(rerun.stderr) == committed, rerun.stderr[-2000:]
  assert re.search(r'train: finished step 30 of 30; .* newest checkpoint \S+/checkpoints/30$',
                   rerun.stderr.strip().splitlines()[-1]), rerun.stderr[-2000:]
  _assert_resumed_exactly(workdir, reference_run)


def _assert_resumed_exactly(workdir, reference_run):
  resumed, reference = train_losses(workdir), train_losses(reference_run)
  assert train_steps_logged(workdir) == list(range(1, 31))  # no step twice, after any kill
  assert [row['step'] for row in eval_lines(workdir)] == [10, 20, 30]
  assert sorted(resumed) == sorted(reference)
  for step, loss in reference.items():
    assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_kill_9_then_rerun_resumes_exactly(reference_run, tmp_path):
  process = _start(tmp_path)
  _wait_for_step(tmp_path, 14, process)  # past the step-10 checkpoint
  deadline = time.monotonic() + 120
  while not (tmp_path / 'checkpoints' / '10' / 'commit_success.txt').exists():  # the async save is done
    assert time.monotonic() < deadline and process.poll() is None
    time.sleep(0.05)
  process.kill()
  process.wait()
  assert max(train_losses(tmp_path)) < 30
  _rerun_and_assert_resumed(tmp_path, reference_run)


@pytest.mark.parametrize('signum,status,name', [(signal.SIGTERM, 0, 'SIGTERM'),
                                                (signal.SIGINT, 130, 'Ctrl-C')], ids=['sigterm', 'ctrl_c'])
def test_stop_signal_saves_then_exits_and_rerun_resumes(reference_run, tmp_path, signum, status, name):
  """Preemption (SIGTERM) and Ctrl-C alike: saved at the step where it stopped, not at step 10, with a
  line naming the checkpoint and no traceback; the rerun continues exactly."""
  process = _start(tmp_path)
  _wait_for_step(tmp_path, 13, process)
  process.send_signal(signum)
  assert process.wait(timeout=120) == status
  stderr = process.stderr.read()
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-2000:]
  stopped_at = max(train_losses(tmp_path))
  assert stopped_at < 30
  saved = {int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()}
  assert max(saved) == stopped_at, (saved, stopped_at)
  assert re.search(rf'train: stopped by {name} after step {stopped_at} of 30; .* newest checkpoint '
                   rf'\S+/checkpoints/{stopped_at}; rerun the same command to resume$',
                   stderr.strip().splitlines()[-1]), stderr[-2000:]
  _rerun_and_assert_resumed(tmp_path, reference_run)


def test_second_ctrl_c_exits_at_once_keeping_the_newest_checkpoint(tmp_path):
  """A Ctrl-C, and another while the run finishes its step (steps of about a second here): the process
  ends at once without saving, in one line naming the newest complete checkpoint, and a rerun resumes
  from it."""
  slow = ('--config.data.seq_len=1024', '--config.train.batch_size=16', '--config.model.d_model=128',
          '--config.model.head_dim=32', '--config.model.mlp_dim=512', '--config.checkpoint.every_steps=1',
          '--config.checkpoint.async_save=False', '--config.train.eval_every=100')
  log = tmp_path / 'stderr.log'
  with log.open('w') as err:
    process = subprocess.Popen(train_command(tmp_path / 'run', *slow), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=err, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  _wait_for_step(tmp_path / 'run', 2, process)
  process.send_signal(signal.SIGINT)
  deadline = time.monotonic() + 60
  while 'train: Ctrl-C: saving' not in log.read_text():
    assert time.monotonic() < deadline and process.poll() is None
    time.sleep(0.01)
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=60) == 130
  stderr = log.read_text()
  assert 'Traceback' not in stderr and 'train: stopped by' not in stderr, stderr[-2000:]
  match = re.search(r'train: second Ctrl-C, stopped at once without saving; \S+/checkpoints/(\d+) is the '
                    r'newest checkpoint$', stderr.strip().splitlines()[-1])
  assert match, stderr[-2000:]
  committed = {int(p.parent.name) for p in (tmp_path / 'run' / 'checkpoints').glob('*/commit_success.txt')}
  newest = int(match.group(1))
  assert newest == max(committed) >= 1
  rerun = run_train(tmp_path / 'run', *slow, f'--config.train.steps={newest + 1}')
  assert resumed_step(rerun.stderr) == newest
  assert train_steps_logged(tmp_path / 'run') == list(range(1, newest + 2))


def _tree(directory):
  """Every file under `directory` with its bytes and modification time: what a refused rerun must keep."""
  return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('flags,refused', [
    (('--config.model.d_model=128', '--config.model.head_dim=32'),
     'model.d_model 64 -> 128; model.head_dim 16 -> 32'),
    (('--config.model.attention=sliding_window', '--config.model.window=16'),
     'model.attention "dense" -> "sliding_window"; model.window 0 -> 16'),
    (('--config.data.tokenizer=sentencepiece:300',), 'data.tokenizer "byte" -> "sentencepiece:300"'),
    (('--config.data.source=stdlib',), 'data.source'),
    (('--config.train.batch_size=16',), 'train.batch_size 8 -> 16'),
    (('--config.train.seed=1',), 'train.seed 0 -> 1'),
    (('--config.train.b2=0.99',), 'train.b2 0.95 -> 0.99'),
], ids=['shape', 'variant', 'tokenizer', 'source', 'batch', 'seed', 'optimizer'])
def test_resume_with_a_state_changing_config_is_refused_and_writes_nothing(reference_run, tmp_path, flags,
                                                                            refused):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run, workdir)
  before = _tree(workdir)
  result = run_train(workdir, *flags, check=False)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert last.startswith(f'config error: --workdir={workdir} holds a run these changes would break: ')
  assert refused in last and last.endswith('Use a new --workdir, or rerun with the saved values '
                                           '(its config.json)')
  assert _tree(workdir) == before


def test_a_second_training_on_the_same_workdir_is_refused(reference_run, tmp_path):
  """Two trainings on one directory would overwrite each other's checkpoints: while one holds the run
  (here, this test), another is refused in one line naming the holder, and changes nothing."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run, workdir)
  held = rundir.lock(workdir)
  before = _tree(workdir)
  result = run_train(workdir, '--config.train.steps=40', check=False)
  held.close()
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert re.match(rf'config error: --workdir={workdir} is being trained by pid {os.getpid()} on \S+; wait ',
                  result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
  assert _tree(workdir) == before


def test_resume_may_change_length_cadence_and_mesh(reference_run, tmp_path):
  """Keys that leave the state's shape alone change on resume, each in a logged line: the run trains on
  from 30 to 36 with the new cadence on 2 devices."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run, workdir)
  result = run_train(workdir, '--config.train.steps=36', '--config.train.eval_every=3',
                     '--config.checkpoint.every_steps=3', '--config.mesh.fsdp=2', devices=2)
  assert resumed_step(result.stderr) == 30
  for change in ('train.steps 30 -> 36', 'train.eval_every 10 -> 3', 'checkpoint.every_steps 10 -> 3',
                 'mesh.fsdp 1 -> 2'):
    assert f'train: changed on resume: {change}' in result.stderr
  assert train_steps_logged(workdir) == list(range(1, 37))
  assert [row['step'] for row in eval_lines(workdir)] == [10, 20, 30, 33, 36]
  assert json.loads((workdir / 'config.json').read_text())['train']['steps'] == 36


def test_bad_config_fails_fast_with_one_line(tmp_path):
  started = time.monotonic()
  result = run_train(tmp_path, '--config.model.attention=bogus', check=False)
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith('config error: model.attention='), result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'checkpoints').exists()
  assert time.monotonic() - started < 60


def test_sentencepiece_tokenizer_trains_and_reports_bits_per_byte(tmp_path):
  run_train(tmp_path, '--config.data.tokenizer=sentencepiece:512', '--config.train.steps=10')
  assert (tmp_path / 'tokenizer.model').exists()
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model']['vocab_size'] == 512
  evals = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
           if 'eval_bpb' in line]
  # Bits per byte are bits per token over the bytes each target token stands for, counted here from the
  # run's own tokenizer and validation batches; a subword token covers more than one byte.
  run = evaluate.trainer.load_run(tmp_path)
  batches = data.eval_batches(run.config, run.tok)
  targets = np.concatenate([batch['targets'].ravel() for batch in batches])
  bytes_per_token = run.tok.token_bytes[targets].sum() / targets.size
  assert bytes_per_token > 1.2
  bits_per_token = evals[-1]['eval_loss'] / np.log(2)
  assert evals[-1]['eval_bpb'] == pytest.approx(bits_per_token / bytes_per_token, rel=1e-4)


def test_a_tokenizer_the_user_has_trains_evaluates_and_samples(tmp_path):
  """`data.tokenizer=hf:PATH`: a byte-level BPE tokenizer.json (trained here, as a user's GPT-2 one)
  sets the vocabulary, is copied into the run, and sampling decodes through it."""
  path = write_bpe(tmp_path / 'bpe', vocab_size=400)
  run_train(tmp_path / 'run', f'--config.data.tokenizer=hf:{path}', '--config.train.steps=10')
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['model']['vocab_size'] == 400
  assert (tmp_path / 'run' / 'tokenizer.json').read_bytes() == path.read_bytes()
  assert all(math.isfinite(row['eval_bpb']) and row['eval_bpb'] > 0 for row in eval_lines(tmp_path / 'run'))
  path.unlink()  # the run reads its own copy from now on
  sampled = subprocess.run([sys.executable, '-m', 'sparse_lm.sample', f'--workdir={tmp_path / "run"}',
                            '--prompt=def ', '--max_new_tokens=16', '--temperature=0'], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert sampled.stdout.splitlines()[0] == '[dense model, step 10]'
  assert sampled.stdout.splitlines()[1].startswith('def ')


def test_trains_on_nanogpt_token_shards_and_resumes_exactly(tmp_path):
  """`data.source=bin:GLOB`: the test corpus tokenized with a BPE trained here, written as nanoGPT
  shards; a run on them learns, and resumed from its step-10 checkpoint it repeats the same losses."""
  path = write_bpe(tmp_path / 'bpe', vocab_size=400)
  tok = tokenizer.make_tokenizer(_config_with(f'hf:{path}'), str(tmp_path / 'probe'))
  text = CORPUS_FILE.read_text(encoding='utf-8')[:400_000]
  tokens = np.concatenate([np.append(tok.encode(doc), tok.eos_id) for doc in text.split('\n\n\n')])
  for k, part in enumerate(np.array_split(tokens, 3)):
    files.write_bin(str(tmp_path / f'shard_{k:03d}.bin'), part)
  flags = (f'--config.data.source=bin:{tmp_path}/shard_*.bin', f'--config.data.tokenizer=hf:{path}',
           '--config.data.packing=concat', '--config.train.steps=20')
  run_train(tmp_path / 'whole', *flags)
  losses = train_losses(tmp_path / 'whole')
  # One batch's loss is noisy (+-0.3 here): the last five steps' mean is checked against a uniform guess.
  assert np.mean([losses[step] for step in range(16, 21)]) < math.log(400) - 0.6, losses
  shutil.copytree(tmp_path / 'whole', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '20')  # as if killed before step 20's save
  assert resumed_step(run_train(tmp_path / 'resumed', *flags).stderr) == 10
  assert train_steps_logged(tmp_path / 'resumed') == list(range(1, 21))
  resumed = train_losses(tmp_path / 'resumed')
  for step in range(1, 21):
    assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def _config_with(tokenizer_spec):
  config = base_config()
  config.data.tokenizer = tokenizer_spec
  return config


def test_diverging_run_stops_keeping_its_last_finite_checkpoint(tmp_path):
  """At learning rate 1e4 the gradient norm turns NaN within a few steps: the run stops one step later,
  in one line and non-zero, without saving that state; its newest checkpoint evaluates to a finite
  perplexity, and a rerun at a sane learning rate resumes from it."""
  diverging = run_train(tmp_path, '--config.train.learning_rate=1e4', '--config.train.warmup_steps=1',
                        '--config.checkpoint.every_steps=2', check=False)
  last = diverging.stderr.strip().splitlines()[-1]
  assert diverging.returncode == 1 and 'Traceback' not in diverging.stderr, diverging.stderr[-2000:]
  match = re.match(r'train: non-finite step (\d+): .*step (\d+)\.$', last)
  assert match, last
  bad, newest = map(int, match.groups())
  assert max(train_losses(tmp_path)) <= bad + 1  # stopped within a step of reading the flag
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved[-1] == newest < bad
  result = evaluate.run_task(tmp_path, 'perplexity', evaluate.Options())
  assert result['step'] == newest and all(math.isfinite(row['eval_loss']) for row in result['results'])

  rerun = run_train(tmp_path, '--config.train.learning_rate=1e-3', '--config.train.steps=8')
  assert resumed_step(rerun.stderr) == newest
  assert 'train: changed on resume: train.learning_rate 10000.0 -> 0.001' in rerun.stderr
  resumed = {s: v for s, v in train_losses(tmp_path).items() if s > newest}
  assert sorted(resumed) == list(range(newest + 1, 9)) and all(map(math.isfinite, resumed.values()))


def test_skip_mode_stops_after_consecutive_skips(tmp_path):
  """`train.on_nonfinite=skip`: non-finite steps are counted in `skipped_steps`, and
  `train.max_skipped_steps` of them in a row stop the run; every checkpoint it saved is finite."""
  run = run_train(tmp_path, '--config.train.learning_rate=1e4', '--config.train.warmup_steps=1',
                  '--config.checkpoint.every_steps=2', '--config.train.on_nonfinite=skip',
                  '--config.train.max_skipped_steps=3', check=False)
  last = run.stderr.strip().splitlines()[-1]
  assert run.returncode == 1 and re.match(r'train: 3 non-finite steps in a row \(train.max_skipped_steps=3\)',
                                          last), last
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  skipped = [row['skipped_steps'] for row in rows if 'loss' in row]
  assert skipped[0] == 0 and max(skipped) >= 2 and skipped == sorted(skipped)
  result = evaluate.run_task(tmp_path, 'perplexity', evaluate.Options())
  assert all(math.isfinite(row['eval_loss']) for row in result['results'])
