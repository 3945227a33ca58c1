"""lm-evaluation-harness on a run: the three request types scored as the trainer's own loss scores the same
tokens, a non-causal model scored per prefix, and `lm_eval --model sparse_lm` running local YAML tasks over
JSONL files end to end (offline)."""

import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

from sparse_lm import harness, sample, trainer
from sparse_lm.errors import ConfigError
from tests.conftest import CORPUS_FILE, REPO, run_train

STEPS = ('--config.train.steps=4', '--config.train.warmup_steps=1', '--config.checkpoint.every_steps=2',
         '--config.checkpoint.keep=3', '--config.train.eval_every=4')


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('dense')
  run_train(workdir, *STEPS)
  return workdir


@pytest.fixture(scope='module')
def lm(dense_run):
  return harness.SparseLM(workdir=str(dense_run), batch_size=3)


def texts(count: int, size: int, start: int = 5000) -> list[str]:
  corpus = CORPUS_FILE.read_text(encoding='utf-8')
  return [corpus[start + i * size:start + (i + 1) * size] for i in range(count)]


def own_nll(run, tokens: list[int]) -> np.ndarray:
  """The trainer's per-token loss of `tokens[1:]` given what precedes each (one row, one pass)."""
  batch = {'inputs': jnp.asarray([tokens[:-1]], jnp.int32), 'targets': jnp.asarray([tokens[1:]], jnp.int32)}
  nll_BT, *_ = trainer.forward(run.graphdef, run.variables[0], batch, run.variables[1])
  return np.asarray(nll_BT[0])


def requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_is_the_trainers_loss_of_the_continuation(lm):
  pairs = [('def main(', 'argv):'), ('import numpy as', ' np'), ('', 'class Foo:'), ('x' * 100, ' = 1')]
  got = lm.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True)
  eos = lm.eot_token_id
  for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
    context_enc, continuation_enc = lm.tok_encode(context), lm.tok_encode(continuation)
    if context.endswith(' '):
      pytest.fail('the pairs here have no trailing spaces to move')
    whole = ([eos, *context_enc, *continuation_enc])[-(lm.max_length + 1):]  # 'x' * 100 is cut to 64
    expected = -own_nll(lm.run, whole)[-len(continuation_enc):].sum()
    assert logp == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert isinstance(greedy, bool)


def test_greedy_continuations_are_flagged_greedy(lm):
  prompt = [lm.eot_token_id, *lm.tok_encode('def main(')]
  new = np.asarray(sample.generate(lm.run.graphdef, lm.run.variables, jnp.asarray([prompt], jnp.int32), 3,
                                   jax.random.key(0)))[0].tolist()
  [(_, greedy)] = lm._loglikelihood_tokens([(('', ''), prompt, new)])
  assert greedy
  wrong = [(new[0] + 1) % 256, *new[1:]]
  [(_, greedy)] = lm._loglikelihood_tokens([(('', ''), prompt, wrong)])
  assert not greedy


def test_rolling_loglikelihood_sums_disjoint_windows_of_max_length(lm):
  L = lm.max_length
  short, long = texts(1, 40)[0], texts(1, 2 * L, start=9000)[0]
  tokens = lm.tok_encode(long)
  assert len(tokens) == 2 * L  # byte-level: two full windows
  got = lm.loglikelihood_rolling(requests('loglikelihood_rolling', [(short,), (long,)]), disable_tqdm=True)
  eos = lm.eot_token_id
  assert got[0] == pytest.approx(-own_nll(lm.run, [eos, *lm.tok_encode(short)]).sum(), rel=1e-5)
  # Window 1: EOS and tokens 0..L-2 predict tokens 0..L-1; window 2: tokens L-1..2L-2 predict L..2L-1.
  expected = -own_nll(lm.run, [eos, *tokens[:L]]).sum() - own_nll(lm.run, tokens[L - 1:]).sum()
  assert got[1] == pytest.approx(expected, rel=1e-5)


def test_generate_until_stops_at_the_stop_string_and_the_limit(lm):
  args = [('def main(', {'until': [], 'max_gen_toks': 6}),
          ('import os', {'until': ['\n'], 'max_gen_toks': 6}),
          ('def main(', {'until': [], 'max_gen_toks': 6})]
  first, second, third = lm.generate_until(requests('generate_until', args), disable_tqdm=True)
  prompt = jnp.asarray([[lm.eot_token_id, *lm.tok_encode('def main(')]], jnp.int32)
  ids = sample.generate(lm.run.graphdef, lm.run.variables, prompt, 6, jax.random.key(0))[0].tolist()
  if lm.eot_token_id in ids:
    ids = ids[:ids.index(lm.eot_token_id)]
  assert first == third == lm.tok_decode(ids)
  assert '\n' not in second and len(lm.tok_encode(second)) <= 6


def test_a_checkpoint_by_step_and_bad_model_args_in_one_line(dense_run):
  assert harness.SparseLM(workdir=str(dense_run), step=2).run.step == 2
  assert harness.SparseLM(workdir=str(dense_run)).run.step == 4
  run = str(dense_run)
  for kwargs, says in (({}, r'workdir=DIR is required'),
                       ({'workdir': run, 'step': 3}, r'no complete checkpoint of step 3 \(saved: 2, 4\)'),
                       ({'workdir': run, 'batch_size': 'x'}, r'batch_size=x: must be a positive integer'),
                       ({'workdir': str(dense_run / 'nothing')}, r'no run there')):
    with pytest.raises(ConfigError, match=says) as error:
      harness.SparseLM(**kwargs)
    assert '\n' not in str(error.value)


def test_a_model_that_is_not_causal_is_scored_per_prefix(tmp_path):
  run_train(tmp_path, *STEPS, '--config.model.attention=mosa', '--config.model.num_heads=2',
            '--config.model.mosa.num_heads=4', '--config.model.mosa.include_first=true')
  lm = harness.SparseLM(workdir=str(tmp_path), batch_size=2)
  assert not lm.causal and lm.get_model_info()['scoring'].startswith('exact recomputation per prefix')
  pairs = [('def', ' f('), ('for', ' x:')]  # six prefixes of three lengths: a compile a length, per side
  got = lm.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True)
  for (context, continuation), (logp, _) in zip(pairs, got, strict=True):
    whole = [lm.eot_token_id, *lm.tok_encode(context + continuation)]
    n = len(lm.tok_encode(continuation))
    # Each continuation token from a pass over exactly the tokens up to it: its last position's loss.
    expected = -sum(own_nll(lm.run, whole[:end])[-1] for end in range(len(whole) - n + 1, len(whole) + 1))
    assert logp == pytest.approx(expected, rel=1e-5)


TASKS = {
    'sl_choice': """task: sl_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    'sl_rolling': """task: sl_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/rolling.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
""",
    'sl_generate': """task: sl_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/generate.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
metric_list:
  - metric: exact_match
""",
}


def test_the_command_runs_local_tasks_of_each_request_type(dense_run, lm, tmp_path):
  tasks = tmp_path / 'tasks'
  tasks.mkdir()
  for name, text in TASKS.items():
    (tasks / f'{name}.yaml').write_text(text.format(dir=tasks))
  choice = [{'question': 'def main(', 'choices': ['argv):', 'zzzz'], 'answer': 0},
            {'question': 'import', 'choices': [' os', ' ~~~'], 'answer': 1}]
  rolling = [{'text': t} for t in texts(3, 50)]  # one window each: the trainer's one pass
  generate = [{'prompt': 'def main(', 'answer': 'argv)'}, {'prompt': 'import ', 'answer': 'os'}]
  for name, rows in (('choice', choice), ('rolling', rolling), ('generate', generate)):
    (tasks / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  out = tmp_path / 'out'
  lm_eval = str(pathlib.Path(sys.executable).parent / 'lm_eval')  # the interface: lm-eval's own command
  run = subprocess.run([lm_eval, '--model', 'sparse_lm', '--model_args',
                        f'workdir={dense_run},batch_size=2', '--tasks', 'sl_choice,sl_rolling,sl_generate',
                        '--include_path', str(tasks), '--output_path', str(out), '--log_samples'],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  [path] = out.rglob('results_*.json')
  saved = json.loads(path.read_text())
  results = saved['results']
  assert saved['config']['attention'] == 'dense' and saved['config']['scoring'] == 'one pass per batch'
  # Bits per byte from the trainer's own loss on the same documents, each after an EOS.
  nll = sum(own_nll(lm.run, [lm.eot_token_id, *lm.tok_encode(r['text'])]).sum() for r in rolling)
  total_bytes = sum(len(r['text'].encode()) for r in rolling)
  bpb = nll / total_bytes / math.log(2)
  assert results['sl_rolling']['bits_per_byte,none'] == pytest.approx(bpb, rel=1e-4)
  # Accuracy: the choice of higher log-likelihood, as the harness defines `acc`.
  pairs = [(d['question'], c) for d in choice for c in d['choices']]
  scored = lm.loglikelihood(requests('loglikelihood', pairs), disable_tqdm=True)
  right = [np.argmax([scored[2 * i][0], scored[2 * i + 1][0]]) == d['answer'] for i, d in enumerate(choice)]
  assert results['sl_choice']['acc,none'] == pytest.approx(np.mean(right))
  # Generations: what the model's generate_until gives for the same prompts, stopped at the newline.
  [samples] = out.rglob('samples_sl_generate_*.jsonl')
  logged = {json.loads(line)['doc']['prompt']: json.loads(line)['resps'][0][0]
            for line in samples.read_text().splitlines()}
  args = [(g['prompt'], {'until': ['\n'], 'max_gen_toks': 5}) for g in generate]
  assert [logged[g['prompt']] for g in generate] == lm.generate_until(requests('generate_until', args),
                                                                      disable_tqdm=True)
  assert results['sl_generate']['exact_match,none'] == np.mean(
      [logged[g['prompt']] == g['answer'] for g in generate])


@pytest.mark.parametrize('args,says', [
    (('--model_args', 'workdir={run}', '--tasks', 'not_a_task'), r'^harness: Tasks not found: not_a_task \('),
    (('--model_args', 'workdir={run}/nothing', '--tasks', 'lambada_openai'), r'^harness: --workdir=\S+: no'),
])
def test_the_command_refuses_bad_input_in_one_line(dense_run, args, says):
  args = [a.format(run=dense_run) for a in args]
  run = subprocess.run([sys.executable, '-m', 'sparse_lm.harness', '--model', 'sparse_lm', *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode != 0 and re.search(says, run.stderr.strip().splitlines()[-1]), run.stderr[-2000:]


def test_the_install_registers_the_model_with_lm_eval_and_loads_nothing_at_start_up():
  check = ("import sys; assert 'jax' not in sys.modules and 'lm_eval' not in sys.modules, 'at start-up'; "
           "from lm_eval.api.registry import get_model; from sparse_lm import harness; "
           "assert get_model('sparse_lm') is harness.SparseLM")
  run = subprocess.run([sys.executable, '-c', check], cwd='/', capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
