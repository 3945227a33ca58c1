"""The RULER-style suite and loss by position: prompts of exactly the asked length that hold what their
answers need, deterministic by seed, in a byte-level and a BPE tokenizer; the scoring pipeline; the
commands end to end on a tiny run; bad input in one line."""

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from sparse_lm import checks, evaluate, ruler, tokenizer
from sparse_lm.errors import ConfigError
from tests.conftest import CORPUS_FILE, REPO, eval_lines, run_train, tiny_config, write_bpe

TEXT = CORPUS_FILE.read_text(encoding='utf-8')[:200_000]


def byte_builder() -> tuple[ruler.Builder, object]:
  tok = tokenizer.ByteTokenizer()
  return ruler.Builder(lambda t: [int(i) for i in tok.encode(t)], tok.eos_id, TEXT), tok


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  path = write_bpe(tmp_path_factory.mktemp('bpe'))
  return tokenizer._from_file(f'hf:{path}', str(path))


def builders(bpe):
  byte, byte_tok = byte_builder()
  return [(byte, byte_tok), (ruler.Builder(lambda t: [int(i) for i in bpe.encode(t)], bpe.eos_id, TEXT), bpe)]


@pytest.mark.parametrize('task', ruler.TASKS)
def test_every_task_writes_prompts_of_the_asked_length_that_hold_their_answers(task, bpe):
  for builder, tok in builders(bpe):
    for length in (1024, 3000):
      example = builder.example(task, length, ruler.rng_for(0, task, length, 0))
      assert len(example.prompt) == length and example.prompt[0] == tok.eos_id
      text = tok.decode(example.prompt)
      context = text[:text.rindex(' Question:')] if task in ('vt', 'cwe', 'fwe') else text
      if task.startswith('niah'):
        for answer in example.answers:  # the values asked for, each in a needle of the asked key
          assert f'is: {answer}.' in context
        if task == 'niah_multikey_1':
          assert context.count('One of the special magic numbers for') == 4
        if task in ('niah_multikey_2', 'niah_multikey_3'):  # a haystack of other keys' needles
          assert context.count('One of the special magic numbers for') > 4
      elif task == 'vt':
        value = example.answers and text.split('assigned the value ')[1].split()[0]
        assert f'VAR {example.answers[0]} = {value}.' in context
        for a, b in zip(example.answers, example.answers[1:], strict=False):
          assert f'VAR {b} = VAR {a}.' in context and context.index(f'VAR {a} ') < context.index(f'VAR {b} ')
      else:  # the answers are the most frequent words of the list, strictly
        words = Counter(w for w in context.split() if w.isalpha() and w.islower())
        top = sorted(words.values(), reverse=True)
        k = len(example.answers)
        assert {words[a] for a in example.answers} >= {top[k - 1]} and top[k - 1] > top[k]
        assert set(example.answers) == {w for w, n in words.items() if n >= top[k - 1]}
      assert example.max_new >= len(tok.encode(' ' + ', '.join(example.answers)))


def test_examples_are_the_same_for_a_seed_and_differ_across_seeds():
  builder, _ = byte_builder()
  a = builder.example('niah_multivalue', 2048, ruler.rng_for(0, 'niah_multivalue', 2048, 3))
  b = builder.example('niah_multivalue', 2048, ruler.rng_for(0, 'niah_multivalue', 2048, 3))
  c = builder.example('niah_multivalue', 2048, ruler.rng_for(1, 'niah_multivalue', 2048, 3))
  assert a == b and a.answers != c.answers


def test_recall_is_rulers_string_match_all():
  assert ruler.recall(' 123, 456 and then', ('123', '456')) == 1.0
  assert ruler.recall('ABC', ('abc', 'xyz')) == 0.5
  assert ruler.recall('', ('1',)) == 0.0


def test_a_prompt_too_short_for_its_task_is_refused():
  builder, _ = byte_builder()
  with pytest.raises(ValueError, match=r'a prompt of 300 tokens cannot hold niah_multiquery\'s needles'):
    builder.example('niah_multiquery', 300, ruler.rng_for(0, 'niah_multiquery', 300, 0))


def test_position_buckets_are_log_spaced_and_cover_every_position():
  buckets = evaluate.position_buckets(1024)
  assert buckets[0] == (0, 1) and buckets[-1][1] == 1024
  assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:], strict=False))
  widths = [b - a for a, b in buckets]
  assert widths == sorted(widths) and widths[-1] > 100 * widths[0]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  run_train(workdir, *SHORT)
  return workdir


SHORT = ('--config.train.steps=2', '--config.train.warmup_steps=1', '--config.checkpoint.every_steps=2',
         '--config.train.eval_every=2')


FAST = evaluate.Options(lengths=(1024,), num_samples=2, tasks=('niah_single_2', 'vt', 'fwe'))


def test_ruler_scores_what_the_model_writes_and_logs_a_line_per_cell(run_dir, monkeypatch):
  result = evaluate.run_task(run_dir, 'ruler', FAST)
  assert [(r['ruler_task'], r['length']) for r in result['lines']] == [('niah_single_2', 1024), ('vt', 1024),
                                                                        ('fwe', 1024)]
  assert all(0.0 <= r['score'] <= 1.0 and 0.0 <= r['score_parallel'] <= 1.0 for r in result['lines'])
  lines = [json.loads(x) for x in (run_dir / 'eval.jsonl').read_text().splitlines()][-4:]
  assert [x.get('ruler_task') for x in lines] == ['niah_single_2', 'vt', 'fwe', None]
  assert lines[-1]['average_by_length'] == {'1024': pytest.approx(np.mean([r['score'] for r in lines[:3]]))}
  assert (run_dir / 'ruler_step2.png').read_bytes().startswith(b'\x89PNG')
  # answer_loss comes from the parallel pass's per-token losses, which are the trainer's own.
  assert all(r['answer_loss'] > 0 for r in result['lines'])
  run = evaluate.trainer.load_run(run_dir)
  row = [int(i) for i in run.tok.encode(evaluate._source_text(run, '', 100)[0])][:100]
  (hits, nll), = evaluate._greedy_hits(run, [row])
  batch = {'inputs': np.asarray([row[:-1]], np.int32), 'targets': np.asarray([row[1:]], np.int32)}
  np.testing.assert_allclose(nll, np.asarray(evaluate._nll(run.graphdef, run.variables, batch))[0], rtol=1e-5)
  assert hits.shape == nll.shape == (99,)
  # The pipeline, with a model that writes the answers (decoding) or predicts every gold token (parallel):
  # full recall; with one that writes nothing and predicts nothing: none.
  tok = tokenizer.ByteTokenizer()

  def writes_answers(graphdef, variables, prompts, num_new, key, **kwargs):
    rows = []
    for prompt in np.asarray(prompts).tolist():
      answers = answers_by_prompt[tuple(prompt)]
      ids = [int(i) for i in tok.encode(' ' + ', '.join(answers))][:num_new]
      rows.append(ids + [tok.eos_id] * (num_new - len(ids)))
    return np.asarray(rows)
  answers_by_prompt = {}
  builder = ruler.Builder(lambda t: [int(i) for i in tok.encode(t)], tok.eos_id,
                          '\n'.join(evaluate._source_text(evaluate.trainer.load_run(run_dir), '', 1024)))
  for name in FAST.tasks:
    for n in range(2):
      example = builder.example(name, 1024, ruler.rng_for(0, name, 1024, n))
      answers_by_prompt[tuple(example.prompt)] = example.answers
  monkeypatch.setattr(evaluate.sample, 'generate', writes_answers)
  monkeypatch.setattr(evaluate, '_greedy_hits', lambda run, rows: [
      (np.ones(len(r) - 1, bool), np.zeros(len(r) - 1)) for r in rows])
  assert evaluate.run_task(run_dir, 'ruler', FAST)['average_by_length_parallel'] == {'1024': 1.0}
  assert [r['score'] for r in _last_cells(run_dir)] == [1.0, 1.0, 1.0]
  assert [r['answer_loss'] for r in _last_cells(run_dir)] == [0.0, 0.0, 0.0]
  monkeypatch.setattr(evaluate.sample, 'generate', lambda g, v, prompts, num_new, key, **kw: np.full(
      (len(prompts), num_new), tok.eos_id))
  monkeypatch.setattr(evaluate, '_greedy_hits', lambda run, rows: [
      (np.zeros(len(r) - 1, bool), np.ones(len(r) - 1)) for r in rows])
  result = evaluate.run_task(run_dir, 'ruler', FAST)
  assert result['score'] == 0.0 and result['average_by_length_parallel'] == {'1024': 0.0}
  assert result['answer_loss_by_length'] == {'1024': 1.0}
  # A loss equal to each token's position: answer_loss is the mean position of the answers' tokens (the
  # token after the prompt's last up to the row's last: the span bookkeeping covers exactly those).
  monkeypatch.setattr(evaluate, '_greedy_hits', lambda run, rows: [
      (np.zeros(len(r) - 1, bool), np.arange(len(r) - 1, dtype=float)) for r in rows])
  for cell in evaluate.run_task(run_dir, 'ruler', FAST)['lines']:
    examples = [builder.example(cell['ruler_task'], 1024, ruler.rng_for(0, cell['ruler_task'], 1024, n))
                for n in range(2)]
    joined = ' ' if cell['ruler_task'] == 'vt' else ', '
    first_last = [(len(e.prompt) - 1, len(e.prompt) + len(tok.encode(' ' + joined.join(e.answers))) - 2)
                  for e in examples]
    assert cell['answer_loss'] == pytest.approx(np.mean([(a + b) / 2 for a, b in first_last]))


def _last_cells(run_dir) -> list[dict]:
  lines = [json.loads(x) for x in (run_dir / 'eval.jsonl').read_text().splitlines()]
  return [x for x in lines[-4:] if 'ruler_task' in x]


def test_position_loss_buckets_cover_every_position_and_overlay_runs(run_dir, tmp_path):
  other = tmp_path / 'other'
  run_train(other, *SHORT, '--config.model.attention=sliding_window', '--config.model.window=8')
  evaluate.run_task(other, 'position_loss', evaluate.Options(documents=3, source='stdlib'))
  result = evaluate.run_task(run_dir, 'position_loss', evaluate.Options(documents=3, source='stdlib',
                                                                      overlay=(str(other),)))
  assert result['length'] == 64 and result['documents'] == 3
  sizes = [b['end'] - b['start'] for b in result['buckets']]
  assert sum(sizes) == 64
  mean = np.average([b['loss'] for b in result['buckets']], weights=sizes)
  assert mean == pytest.approx(result['mean_loss'], rel=1e-5)
  assert (run_dir / 'position_loss_step2.png').read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize('args,says', [
    (('--task=ruler', '--tasks=niah_single_9'), r"'niah_single_9' is not a RULER task; the tasks: niah_"),
    (('--task=ruler', '--lengths=300', '--tasks=vt'), r'--lengths=300 --tasks=vt: a prompt of 300 tokens'),
    (('--task=position_loss', '--lengths=100000'), r'no document of .* has 100000 tokens'),
    (('--task=position_loss', '--overlay=/nonexistent'), r'--overlay=/nonexistent: no position_loss line'),
    (('--task=position_loss', '--documents=0'), r'--documents=0 must be at least 1'),
])
def test_bad_input_is_refused_in_one_line(run_dir, args, says):
  run = subprocess.run([sys.executable, '-m', 'sparse_lm.evaluate', f'--workdir={run_dir}', *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('evaluate: ') and re.search(says, last), run.stderr[-2000:]


def test_lengths_beyond_what_windows_reach_and_tokenizers_without_text_are_refused(tmp_path):
  run_train(tmp_path / 'window', '--config.train.steps=1', '--config.train.warmup_steps=1',
            '--config.checkpoint.every_steps=1', '--config.train.eval_every=1',
            '--config.model.attention=sliding_window', '--config.model.window=8')
  with pytest.raises(ConfigError, match=r"^--lengths=1024: 1024 is beyond the 16 tokens model.attention="
                     r"'sliding_window' can reach \(its layers' windows\); allowed: up to 16$"):
    evaluate.run_task(tmp_path / 'window', 'ruler', FAST)
  run_train(tmp_path / 'ids', '--config.train.steps=1', '--config.train.warmup_steps=1',
            '--config.checkpoint.every_steps=1', '--config.train.eval_every=1', '--config.data.source=mqar',
            '--config.data.tokenizer=ids:256')
  with pytest.raises(ConfigError, match=r"^data.tokenizer='ids:256' cannot write the suite's prompts"):
    evaluate.run_task(tmp_path / 'ids', 'ruler', FAST)


def test_training_runs_its_eval_tasks_at_every_evaluation(tmp_path):
  run_train(tmp_path / 'run', '--config.train.steps=4', '--config.train.warmup_steps=1',
            '--config.checkpoint.every_steps=4', '--config.train.eval_every=2',
            '--config.train.eval_tasks=position_loss,mqar', '--config.train.eval_task_samples=2')
  evals = eval_lines(tmp_path / 'run')
  assert [row['step'] for row in evals] == [2, 4]
  for row in evals:
    assert row['position_loss'] > 0 and 0.0 <= row['mqar_accuracy'] <= 1.0
    assert row['position_loss/0_1'] > 0 and row['position_loss/49_64'] > 0  # the buckets' ends
  for flag, says in (
      ('--config.train.eval_tasks=passkey',
       r"train.eval_tasks='passkey' at data.seq_len=64: a passkey prompt needs more than \d+ tokens"),
      ('--config.train.eval_tasks=position_loss,hellaswag',
       r"train.eval_tasks='position_loss,hellaswag': 'hellaswag' is not one of position_loss, passkey")):
    run = run_train(tmp_path / flag[-8:], flag, check=False)
    assert run.returncode != 0 and re.search(says, run.stderr.strip().splitlines()[-1]), run.stderr


def test_eval_tasks_are_refused_on_more_than_one_process():
  config = tiny_config()
  config.train.eval_tasks = 'position_loss'
  checks.check_train(config, num_devices=1, process_count=1)
  says = r"^train.eval_tasks='position_loss' runs on one process, and this run has 2; evaluate its"
  with pytest.raises(ConfigError, match=says):
    checks.check_train(config, num_devices=2, process_count=2)
