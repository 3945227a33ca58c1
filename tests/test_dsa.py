"""DSA: the lightning indexer's scores (Eq. 1) against numpy, the layer against a per-query loop of the
top-k rule (tokens and blocks), dense attention when top_k covers every token and during the warm-up,
the indexer's KL against numpy in both stages, the indexer learning from its KL only, the recall
metric, and a training run whose warm-up survives a resume. Causality, decoding, the kernel path and
config errors are checked with every variant in tests/test_variants.py."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.attention import dsa
from sparse_lm.layers import AuxLoss
from tests.conftest import fresh_seed, run_train, tiny_config, train_losses
from tests.test_variants import _check_documents_as_alone

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _layer(**dsa_settings):
  c = tiny_config(attention='dsa', dsa={'index_heads': 2, 'index_head_dim': 8, 'top_k': 8,
                                        'recall_queries': 8, **dsa_settings}).model
  return dsa.Attention(c, rngs=nnx.Rngs(fresh_seed()))


def _inputs(B=2, T=21):
  x = jnp.asarray(np.random.default_rng(fresh_seed()).standard_normal((B, T, 64)), jnp.float32)
  return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def test_index_scores_are_eq_1():
  layer = _layer()
  x, pos = _inputs()
  qi, w, ki = (np.asarray(a, np.float64) for a in layer._indexer(x, pos))
  got = np.asarray(layer._index_scores(*layer._indexer(x, pos)))
  want = np.einsum('bti,btis->bts', w, np.maximum(np.einsum('btid,bsd->btis', qi, ki) / np.sqrt(8), 0))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _naive(layer, x, pos, block_size, top_k):
  """Per query: rank the earlier tokens (or begun blocks, by their best token; the own block first) by
  the layer's index scores, keep top_k tokens' worth, and attend each head over them with one softmax."""
  q, k, v = (np.asarray(a, np.float64) for a in layer._qkv(x, pos))
  score = np.asarray(layer._index_scores(*layer._indexer(x, pos)))
  B, T, H, D = q.shape
  G = H // k.shape[2]
  out = np.zeros(q.shape)
  for b, t in np.ndindex(B, T):
    if block_size == 1:
      keys = sorted(sorted(range(t + 1), key=lambda s: (-score[b, t, s], s))[:top_k])
    else:
      own = t // block_size
      best = {j: score[b, t, j * block_size:min((j + 1) * block_size, t + 1)].max() for j in range(own)}
      others = sorted(best, key=lambda j: (-best[j], j))[:top_k // block_size - 1]
      keys = [s for j in sorted([own, *others]) for s in range(j * block_size, (j + 1) * block_size)
              if s <= t]
    for h in range(H):
      s = k[b, keys, h // G] @ q[b, t, h] / np.sqrt(D)
      p = np.exp(s - s.max())
      out[b, t, h] = p / p.sum() @ v[b, keys, h // G]
  return out


@pytest.mark.parametrize('block_size,top_k', [(1, 8), (1, 3), (4, 8), (3, 9)])
def test_layer_follows_the_top_k_rule(block_size, top_k):
  layer = _layer(block_size=block_size, top_k=top_k)
  x, pos = _inputs()
  got = layer(x, pos)[0]
  want = layer._output(jnp.asarray(_naive(layer, x, pos, block_size, top_k), jnp.float32))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _dense(layer, x, pos):
  return layer._output(layer.attend(*layer._qkv(x, pos)))


def test_top_k_of_every_token_is_dense_attention_with_full_recall():
  layer = _layer(top_k=32)
  x, pos = _inputs(T=21)
  np.testing.assert_allclose(layer(x, pos)[0], _dense(layer, x, pos), atol=2e-5, rtol=2e-5)
  assert float(layer._recall(*layer._qkv(x, pos)[:2], *layer._indexer(x, pos), pos)) == 1.0


def test_warm_up_is_dense_then_sparse_and_the_clock_moves_on_train_steps_only():
  layer = _layer(dense_warmup_steps=2, top_k=4)
  x, pos = _inputs()
  dense_y = _dense(layer, x, pos)
  np.testing.assert_allclose(layer(x, pos)[0], dense_y, atol=2e-5, rtol=2e-5)
  assert float(layer.clock[...]) == 0  # not a train step
  for _ in range(2):
    nnx.capture(layer, AuxLoss, nnx.Intermediate)(x, pos, update_state=True)
  assert float(layer.clock[...]) == 2
  sparse_y = layer(x, pos)[0]
  np.testing.assert_allclose(sparse_y, layer._output(jnp.asarray(_naive(layer, x, pos, 1, 4), jnp.float32)),
                             atol=2e-5, rtol=2e-5)
  assert float(jnp.abs(sparse_y - dense_y).max()) > 1e-3


def _numpy_kl(layer, x, pos, keys_of):
  """Mean over queries of KL(mean over heads of softmax(q k / sqrt D) || softmax(I)) over `keys_of(b, t)`."""
  q, k, _ = (np.asarray(a, np.float64) for a in layer._qkv(x, pos))
  score = np.asarray(layer._index_scores(*layer._indexer(x, pos)), np.float64)
  B, T, H, D = q.shape
  G = H // k.shape[2]
  total = 0.0
  for b, t in np.ndindex(B, T):
    keys = keys_of(b, t)
    p = np.zeros(len(keys))
    for h in range(H):
      s = k[b, keys, h // G] @ q[b, t, h] / np.sqrt(D)
      p += np.exp(s - s.max()) / np.exp(s - s.max()).sum() / H
    i = score[b, t, keys]
    log_q = i - i.max() - np.log(np.exp(i - i.max()).sum())
    total += np.sum(p * (np.log(p) - log_q))
  return total / (B * T)


def test_kl_is_the_papers_in_both_stages():
  layer = _layer(top_k=5)
  x, pos = _inputs()
  q, k, _ = layer._qkv(x, pos)
  parts = layer._indexer(x, pos)
  dense_kl = dsa._mean_over_queries(*layer._dense_kl(q, k, *parts, pos))  # per query, then the mean
  np.testing.assert_allclose(dense_kl, _numpy_kl(layer, x, pos, lambda b, t: list(range(t + 1))), rtol=1e-4)
  idx = layer._select(*parts, pos)
  chosen = np.asarray(idx)[:, :, 0]
  sparse_kl = dsa._mean_over_queries(*layer._sparse_kl(q, k, *parts, idx, pos))
  want = _numpy_kl(layer, x, pos, lambda b, t: sorted(int(s) for s in chosen[b, t] if s >= 0))
  np.testing.assert_allclose(sparse_kl, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('warmup', [0, 5])
def test_indexer_learns_from_its_kl_only(warmup):
  """The language-model side gives the indexer no gradient; the KL gives gradient to the indexer only."""
  layer = _layer(top_k=4, dense_warmup_steps=warmup)
  x, pos = _inputs()
  r = jnp.asarray(np.random.default_rng(0).standard_normal((2, 21, 64)), jnp.float32)

  def parts(layer):
    (y, _), losses, _ = nnx.capture(layer, AuxLoss, nnx.Intermediate)(x, pos, update_state=True)
    return jnp.sum(y * r), sum(jax.tree.leaves(losses))
  lm = nnx.grad(lambda m: parts(m)[0])(nnx.clone(layer))
  kl = nnx.grad(lambda m: parts(m)[1])(nnx.clone(layer))
  for name in ('index_wq', 'index_wk', 'index_ww'):
    assert float(jnp.abs(lm[name][...]).max()) == 0.0, name
    assert float(jnp.abs(kl[name][...]).max()) > 0, name
  for name in ('wq', 'wk', 'wv', 'wo'):
    assert float(jnp.abs(lm[name][...]).max()) > 0, name
    assert float(jnp.abs(kl[name][...]).max()) == 0.0, name


def test_recall_counts_the_dense_top_k_that_the_selection_covers():
  """A selection of every token covers all; the measured recall is the hand-computed share otherwise."""
  layer = _layer(top_k=4, recall_queries=5)
  x, pos = _inputs(B=1, T=12)
  q, k, _ = layer._qkv(x, pos)
  parts = layer._indexer(x, pos)
  got = float(layer._recall(q, k, *parts, pos))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  score = np.asarray(layer._index_scores(*parts))
  hits = 0
  for t in range(7, 12):
    s_h = np.stack([kn[0, :t + 1, h // 2] @ qn[0, t, h] / 4.0 for h in range(4)])
    p = np.mean(np.exp(s_h - s_h.max(-1, keepdims=True)) / np.exp(s_h - s_h.max(-1, keepdims=True)).sum(
        -1, keepdims=True), axis=0)
    dense_top = set(np.argsort(-p, kind='stable')[:4])
    chosen = set(sorted(range(t + 1), key=lambda s: (-score[0, t, s], s))[:4])
    hits += len(dense_top & chosen)
  assert got == pytest.approx(hits / 20)


def _metric_rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
          if 'loss' in line and '"loss"' in line]


def test_dsa_trains_and_its_warm_up_survives_a_resume(tmp_path):
  common = ('--config.model.attention=dsa', '--config.data.source=stdlib', '--config.model.dsa.top_k=16',
            '--config.model.dsa.dense_warmup_steps=14')
  run_train(tmp_path, *common, '--config.train.steps=10')
  run_train(tmp_path, *common, '--config.train.steps=25')
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.8
  rows = {row['step']: row for row in _metric_rows(tmp_path)}
  for step, row in rows.items():
    assert row['blocks/0/attn/dense_warmup'] == float(step <= 14), step
    assert 0 <= row['blocks/1/attn/indexer_recall'] <= 1 and np.isfinite(row['blocks/1/attn/indexer_kl'])
  assert {11, 14, 15, 25} <= set(rows)  # the resumed run logged its steps


@pytest.mark.parametrize('kernel', ['pallas', 'xla'])
def test_blocks_keep_packed_documents_apart(kernel):
  """Block granularity (blocks of 4, two chosen) under document packing: each document, laid on the block
  grid as the packer lays it, gets what it gets alone (the registry's contract test runs tokens)."""
  _check_documents_as_alone('dsa', kernel, adjust=lambda m: m.dsa.update(block_size=4, top_k=8))
