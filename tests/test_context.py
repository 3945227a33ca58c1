"""Context parallelism (`mesh.context`, sparse_lm/context.py): every registered attention variant either
gives, with each sequence split over 8 CPU devices, the loss and gradients of one device, or refuses the
split in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparse_lm import checks, context
from sparse_lm.attention import REGISTRY
from sparse_lm.errors import ConfigError
from tests.conftest import REPO, run_train, tiny_config, train_losses, xla_flags

SPLIT = sorted(name for name, variant in REGISTRY.items() if variant.context_parallel)
assert SPLIT == sorted(REGISTRY)
GATHERING = ('dsa', 'moba', 'nsa')  # choose keys over the whole sequence: gather what they choose from
# Choose slots over the whole sequence: the slots' rows go from a split by tokens to one by groups
# (a reduce-scatter) and back (an all-gather); their dense or local heads pass K/V around the ring.
SLOTS = ('mosa', 'mosa_causal', 'routing', 'routing_causal')


def test_the_zigzag_gives_each_device_an_early_and_a_late_chunk():
  order = context.zigzag(16, 4)  # 8 chunks of 2: device r holds chunks r and 7 - r
  assert order.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
  x = np.arange(2 * 16).reshape(2, 16)
  reordered = context.reorder({'inputs': x, 'targets': x}, 4)
  assert reordered['positions'].tolist() == [order.tolist()] * 2
  np.testing.assert_array_equal(context.restore(reordered['inputs'], 4), x)
  # Causal work per device (keys each query sees) is the same on every device.
  work = [sum(order[i] + 1 for i in range(4 * r, 4 * r + 4)) for r in range(4)]
  assert len(set(work)) == 1, work


# (kernel, mesh.context, mesh.data, documents, overrides of model.<attention>) per variant: context 8 and
# context 4 x data 2, with and without documents. Dense attention's unmasked kernel ring (the `pallas`
# setting without documents or a window) is one path, every other case the ring of XLA reference steps;
# the gathering variants' split path is one (XLA references at the rows' positions); DSA has a case for
# each of its stages: tokens, blocks of 4, the dense warm-up. DSA keeps index keys in float32 here: in
# bfloat16 (its default) the indexer's gradients differ by bfloat16 rounding (0.3-0.8% of their largest
# value; the loss and metrics do not).
TWO = [('xla', 8, 1, True, {}), ('pallas', 4, 2, False, {})]
CASES = {'dense': TWO, 'sliding_window': [('pallas', 8, 1, True, {}), ('xla', 4, 2, False, {})], 'nsa': TWO,
         'moba': TWO, 'mosa': TWO, 'routing': TWO,
         # The causal forms share the split path of the paper's; one case each for their choice.
         'mosa_causal': [('pallas', 8, 1, True, {})], 'routing_causal': [('pallas', 4, 2, True, {})],
         'dsa': [('xla', 8, 1, True, {'index_dtype': 'float32'}),
                 ('pallas', 4, 2, False, {'index_dtype': 'float32', 'block_size': 4, 'top_k': 8}),
                 ('xla', 4, 2, True, {'index_dtype': 'float32', 'dense_warmup_steps': 5})]}


def test_every_split_variant_has_cases():
  assert sorted(CASES) == SPLIT


@pytest.mark.parametrize('name', SPLIT)
def test_split_variants_match_one_device_on_both_paths_with_and_without_documents(name):
  cases = [[name, kernel, ctx, data, segments, seed, overrides]
           for seed, (kernel, ctx, data, segments, overrides) in enumerate(CASES[name])]
  env = {**os.environ, 'XLA_FLAGS': xla_flags('--xla_force_host_platform_device_count=8'),
         'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, '-m', 'tests.context_parity', json.dumps(cases)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = [json.loads(line) for line in run.stdout.splitlines()]
  assert [row['case'] for row in rows] == [c[:5] for c in cases]
  for row in rows:
    assert row['metrics_split'].keys() == row['metrics_one'].keys(), row
    for metric, value in row['metrics_one'].items():  # DSA's indexer KL and recall, say
      assert row['metrics_split'][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (metric, row)
    assert row['tokens_split'] == 'context', row  # the batch really is split along its tokens
    if row['case'][0] in GATHERING:
      assert row['gathers'] > 0, row
    else:  # keys and values pass around the ring
      assert row['permutes'] > 0, row
    if row['case'][0] in SLOTS:
      assert row['reduce_scatters'] > 0 and row['gathers'] > 0, row
    assert row['loss_split'] == pytest.approx(row['loss_one'], rel=1e-5), row
    assert row['grad_rel_diff'] < 1e-4, row


def test_a_variant_that_cannot_split_refuses_in_one_line(monkeypatch):
  # Every registered variant splits today; a new one starts with `context_parallel = False`.
  monkeypatch.setattr(REGISTRY['mosa'], 'context_parallel', False)
  config = tiny_config(attention='mosa', **REGISTRY['mosa'].tiny_config())
  config.mesh.update(data=1, context=8)
  able = ', '.join(name for name in SPLIT if name not in ('mosa', 'mosa_causal'))  # which inherits it
  with pytest.raises(ConfigError, match=r"^mesh.context=8: model.attention='mosa' does not run with its "
                     r"sequences split yet \(those that do: " + able + r"\); use mesh.context=1$") as error:
    checks.check_train(config, 8, 1)
  assert '\n' not in str(error.value)


def test_a_sequence_that_does_not_split_evenly_is_refused():
  config = tiny_config()
  config.mesh.update(data=1, context=8)
  config.data.seq_len = 72  # 16 chunks of 4.5
  with pytest.raises(ConfigError, match=r'mesh.context=8 cuts each sequence into 16 equal chunks .* '
                     r'data.seq_len=72 must be a multiple of 16'):
    checks.check_train(config, 8, 1)


def test_nsa_refuses_chunks_that_split_a_compressed_block_in_one_line():
  config = tiny_config(attention='nsa', **REGISTRY['nsa'].tiny_config())  # cmp_stride 2
  config.mesh.update(data=1, context=8)
  config.data.seq_len = 48  # 16 chunks of 3
  with pytest.raises(ConfigError, match=r"^mesh.context=8 with model.attention='nsa' needs chunks of a "
                     r"multiple of 2 tokens, so data.seq_len=48 must be a multiple of 32$"):
    checks.check_train(config, 8, 1)


def test_training_with_split_sequences_follows_one_device(tmp_path):
  steps = ('--config.train.steps=6', '--config.train.eval_every=6', '--config.checkpoint.every_steps=6')
  run_train(tmp_path / 'one', *steps)
  run_train(tmp_path / 'split', *steps, '--config.mesh.context=4', '--config.mesh.data=2', devices=8)
  one, split = train_losses(tmp_path / 'one'), train_losses(tmp_path / 'split')
  assert sorted(split) == sorted(one) == list(range(1, 7))
  for step, loss in one.items():
    assert split[step] == pytest.approx(loss, rel=2e-4, abs=2e-4), step
