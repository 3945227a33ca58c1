"""Evaluation: every task runs end to end on a tiny trained run, the causality probe separates causal
models from non-causal ones, and the synthetic tasks put what they promise where they promise."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import data, evaluate, synthetic, tokenizer
from sparse_lm.config import ConfigError
from sparse_lm.model import Transformer, is_causal
from tests.conftest import REPO, run_train, tiny_config

SMALL_NSA = {'cmp_block': 4, 'cmp_stride': 2, 'sel_block': 4, 'num_selected': 3, 'window': 5}
FAST = evaluate.Options(lengths=(128,), depths=(0.0, 0.5, 1.0), num_samples=2,
                        mqar_shapes=((64, 4), (128, 8)), mqar_examples=4)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  run_train(workdir, '--config.train.steps=4', '--config.train.warmup_steps=1',
            '--config.checkpoint.every_steps=4', '--config.train.eval_every=4')
  return workdir


def _eval_lines(workdir) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'eval.jsonl').read_text().splitlines()]


def test_command_prints_one_json_object_and_appends_it(run_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'sparse_lm.evaluate', f'--workdir={run_dir}', '--task=perplexity',
       '--seq_len=64,128'],
      cwd=REPO, capture_output=True, text=True, check=True, timeout=300).stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert result['task'] == 'perplexity' and result['step'] == 4
  assert result['causality_leak'] == 0.0
  assert [row['seq_len'] for row in result['results']] == [64, 128]
  assert all(0 < row['eval_loss'] < 10 and row['eval_bpb'] > 0 for row in result['results'])
  assert _eval_lines(run_dir)[-1] == result


@pytest.mark.parametrize('task', ['causality', 'passkey', 'niah', 'mqar'])
def test_task_scores_in_range_and_is_logged(run_dir, task):
  result = evaluate.run_task(run_dir, task, FAST)
  assert result['causality_leak'] == 0.0 and _eval_lines(run_dir)[-1]['task'] == task
  if task == 'causality':
    assert result['gradient_leak'] == result['leak'] == 0.0 and result['causal']
    return
  assert 0.0 <= result['accuracy'] <= 1.0
  if task == 'mqar':
    assert [(r['seq_len'], r['num_kv_pairs']) for r in result['results']] == [(64, 4), (128, 8)]
    assert result['vocab'] == 256 and result['vocab_scaled']
  else:
    assert np.shape(result['accuracy_by_length_depth']) == (1, 3)
    assert (run_dir / f'{task}_step4.png').read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize('attention,extra', [('dense', {}), ('sliding_window', {'window': 8}),
                                             ('nsa', {})])
def test_leak_is_exactly_zero_for_causal_models(attention, extra):
  cfg = tiny_config(attention=attention, **extra).model
  cfg.nsa.update(SMALL_NSA)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param)
  assert evaluate.model_leak(graphdef, (nnx.to_pure_dict(params),), 16, positions=3) == 0.0


ARCHITECTURES = [
    ('dense', {}, True), ('nsa', {}, True), ('mosa_causal', {}, True), ('routing_causal', {}, True),
    ('dense', {'mlp': 'moe'}, True), ('mosa', {}, False), ('routing', {}, False),
    ('dense', {'mlp': 'moe', 'router': 'expert_choice'}, False)]


@pytest.mark.parametrize('attention,extra,causal', ARCHITECTURES)
def test_architecture_flag_agrees_with_the_probes(attention, extra, causal):
  """`model.is_causal`, which every evaluation line, training eval line, sweep record and frontier plot
  carries, says what both probes measure on a tiny random model of each kind."""
  cfg = tiny_config(attention=attention, mlp=extra.get('mlp', 'dense')).model
  cfg.nsa.update(SMALL_NSA)
  cfg.mosa.update(num_heads=4, sparsity=4)
  cfg.routing.update(num_clusters=4, window=4)
  cfg.moe.router = extra.get('router', 'token_choice')
  assert is_causal(cfg) == causal
  graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param, ...)
  leaks = evaluate.model_leaks(graphdef, (nnx.to_pure_dict(params), nnx.to_pure_dict(rest)), 32,
                               positions=4)
  assert (max(leaks.values()) == 0.0) == causal, leaks


def test_capacity_limited_moe_is_flagged_non_causal():
  cfg = tiny_config(mlp='moe').model
  cfg.moe.execution = 'capacity'
  assert not is_causal(cfg)


def test_leak_is_positive_for_non_causal_functions():
  x_BTD = jax.random.normal(jax.random.key(0), (2, 16, 3))
  positions = evaluate.probe_positions(16, 4)
  assert evaluate.causality_leak(lambda x: jnp.cumsum(x, axis=1), x_BTD, positions) == 0.0
  assert evaluate.causality_leak(lambda x: jnp.cumsum(x[:, ::-1], axis=1)[:, ::-1], x_BTD, positions) > 0
  model = Transformer(tiny_config().model, rngs=nnx.Rngs(0))
  def reversed_model(x):  # a model reading right to left
    return model.from_embeddings(x[:, ::-1])[0]
  x_BTD = jax.random.normal(jax.random.key(1), (1, 16, 64))
  assert evaluate.causality_leak(reversed_model, x_BTD, positions) > 0.01


@pytest.mark.parametrize('vocab', [synthetic.ZOOLOGY_VOCAB, 256])
@pytest.mark.parametrize('seq_len,num_kv_pairs', sorted(synthetic.ZOOLOGY_KV_PAIRS.items()))
def test_mqar_has_zoology_shapes_and_recoverable_answers(seq_len, num_kv_pairs, vocab):
  tokens_T, query_K = synthetic.mqar_example(synthetic.rng_for(0, 'eval', 3), seq_len, num_kv_pairs, vocab)
  assert tokens_T.shape == (seq_len,) and query_K.shape == (num_kv_pairs,)
  context = 2 * num_kv_pairs
  keys, values = tokens_T[0:context:2], tokens_T[1:context:2]
  assert len(set(keys)) == num_kv_pairs and np.all((keys >= 1) & (keys < vocab // 2))
  assert np.all((values >= vocab // 2) & (values < vocab))
  lookup = dict(zip(keys.tolist(), values.tolist(), strict=True))
  assert np.all(query_K >= context) and sorted(tokens_T[query_K].tolist()) == sorted(keys.tolist())
  for q in query_K:
    assert tokens_T[q + 1] == lookup[int(tokens_T[q])]
  assert np.count_nonzero(tokens_T[context:]) == 2 * num_kv_pairs  # the rest of the query region is 0


@pytest.mark.parametrize('depth', [0.0, 0.3, 1.0])
def test_haystack_puts_the_needle_at_the_requested_depth(depth):
  text = synthetic.haystack('abcdefghij', 'NEEDLE', '?', 57, depth)
  assert len(text) == 57 and text.endswith('?')
  assert text.index('NEEDLE') == round(depth * (57 - 6 - 1))
  tokens = synthetic.haystack([1, 2, 3], [9, 9], [7], 20, depth)
  assert len(tokens) == 20 and tokens[round(depth * 17):][:2] == [9, 9]


def test_synthetic_sources_feed_training_one_example_per_window():
  c = tiny_config()
  tok = tokenizer.ByteTokenizer()
  c.data.source = 'mqar'
  batch = next(data.make_train_iterator(c, tok))
  assert batch['inputs'].shape == batch['targets'].shape == (8, 64)
  assert np.all((batch['inputs'][:, 0] >= 1) & (batch['inputs'][:, 0] < 128))  # each row opens with a key
  assert np.all(batch['targets'][:, -1] == tok.eos_id)
  again = next(data.make_train_iterator(c, tok))
  np.testing.assert_array_equal(batch['inputs'], again['inputs'])
  c.data.source, c.data.seq_len = 'passkey:digits=4', 128
  batch = next(data.make_train_iterator(c, tok))
  for inputs_T in batch['inputs']:
    text = tok.decode(inputs_T)
    key = text[-4:]
    assert key.isdigit() and f'The pass key is {key}.' in text
    assert text.endswith(synthetic.PASSKEY_QUESTION + key)


def test_mqar_trains_and_scores_at_zoologys_vocabulary(tmp_path):
  """data.tokenizer=ids:8192: the model embeds Zoology's 8192 symbols, trains on MQAR and is scored in
  that alphabet at Zoology's shapes, not a scaled-down one."""
  run_train(tmp_path, '--config.data.tokenizer=ids:8192', '--config.data.source=mqar:vocab=8192',
            '--config.train.steps=4', '--config.train.warmup_steps=1', '--config.train.eval_every=4',
            '--config.checkpoint.every_steps=4')
  assert json.loads((tmp_path / 'config.json').read_text())['model']['vocab_size'] == 8195
  result = evaluate.run_task(tmp_path, 'mqar', evaluate.Options(mqar_shapes=((64, 4),), mqar_examples=4))
  assert result['vocab'] == synthetic.ZOOLOGY_VOCAB and not result['vocab_scaled']
  assert 0.0 <= result['accuracy'] <= 1.0 and result['causality_leak'] == 0.0


def test_ids_tokenizer_serves_only_mqar():
  c = tiny_config()
  c.data.tokenizer = 'ids:8192'
  with pytest.raises(ConfigError, match=r"^data.tokenizer='ids:8192'.*mqar"):
    tokenizer.vocab_size_for(c)
  c.data.source, c.data.tokenizer = 'mqar:vocab=8192', 'byte'
  with pytest.raises(ConfigError, match='vocab=8192'):
    data.make_train_iterator(c, tokenizer.ByteTokenizer())


def test_perturbation_leak_sees_a_look_ahead_the_gradient_misses():
  x_BTD = jax.random.normal(jax.random.key(0), (2, 12, 3))
  other_BTD = jax.random.normal(jax.random.key(1), (2, 12, 3))
  positions = [2, 6, 10]

  def top_k_gate(x_BTD):  # doubles the positions whose score is in the sequence's top half
    score_BT = jnp.sum(x_BTD, axis=-1)
    threshold_B1 = jnp.sort(score_BT, axis=1)[:, 6:7]
    return x_BTD * (1.0 + jax.lax.stop_gradient(score_BT >= threshold_B1))[..., None]
  assert evaluate.causality_leak(top_k_gate, x_BTD, positions) == 0.0
  assert evaluate.perturbation_leak(top_k_gate, x_BTD, other_BTD, positions) > 0
  assert evaluate.perturbation_leak(lambda x: jnp.cumsum(x, axis=1), x_BTD, other_BTD, positions) == 0.0


def test_a_model_trained_on_tiny_mqar_recalls_the_values(tmp_path):
  """Trained on MQAR (2 pairs in 32 tokens, 16 symbols), a 2-layer model answers nearly every query;
  values come from 8 symbols, so guessing scores 1/8. The eval reads the alphabet from the run."""
  run_train(tmp_path, '--config.data.seq_len=32', '--config.data.source=mqar:num_kv_pairs=2,vocab=16',
            '--config.train.batch_size=64', '--config.train.steps=1000', '--config.train.warmup_steps=50',
            '--config.train.eval_every=1000', '--config.checkpoint.every_steps=1000',
            '--config.train.log_every=100', optimize=True)
  result = evaluate.run_task(tmp_path, 'mqar', evaluate.Options(mqar_shapes=((32, 2),), mqar_examples=128))
  assert result['vocab'] == 16
  assert result['accuracy'] > 0.9, result
