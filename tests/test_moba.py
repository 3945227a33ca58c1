"""MoBA: the layer's attention against a per-query loop of the paper's rule (per kv group), a short
training run, and the hybrid with its last layers dense. Causality, decoding, the kernel path and config
errors are checked with every variant in tests/test_variants.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import checks, flops
from sparse_lm.attention import dense, moba
from sparse_lm.errors import ConfigError
from sparse_lm.model import Transformer
from tests.conftest import fresh_seed, run_train, tiny_config, train_losses


def _naive(q, k, v, block_size, top_k):
  """For each query and kv group: score every begun block by the group's summed dot products with the
  block's mean key, keep the own block and the best others up to top_k, softmax over their keys <= t."""
  B, T, H, D = q.shape
  K = k.shape[2]
  G = H // K
  out = np.zeros(q.shape)
  for b in range(B):
    for kv in range(K):
      for t in range(T):
        own = t // block_size
        means = [k[b, j * block_size:(j + 1) * block_size, kv].mean(0) for j in range(own + 1)]
        heads = range(kv * G, (kv + 1) * G)
        score = {j: sum(q[b, t, h] @ means[j] for h in heads) for j in range(own)}
        others = sorted(score, key=lambda j: (-score[j], j))[:top_k - 1]
        keys = [s for j in [own, *others] for s in range(j * block_size, (j + 1) * block_size) if s <= t]
        for h in heads:
          s = np.array([q[b, t, h] @ k[b, s_, kv] for s_ in keys]) / np.sqrt(D)
          p = np.exp(s - s.max())
          out[b, t, h] = (p / p.sum()) @ v[b, keys, kv]
  return out


@pytest.mark.parametrize('block_size,top_k', [(4, 2), (3, 3), (8, 1)])
def test_attention_follows_the_papers_rule(block_size, top_k):
  c = tiny_config(attention='moba', moba={'block_size': block_size, 'top_k': top_k}).model
  layer = moba.Attention(c, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(fresh_seed())
  B, T = 2, 21
  q = rng.standard_normal((B, T, 4, 16))
  k, v = rng.standard_normal((2, B, T, 2, 16))
  got = jax.jit(layer.attend)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  np.testing.assert_allclose(got, _naive(q, k, v, block_size, top_k), atol=2e-5, rtol=2e-5)


def test_moba_model_trains_on_the_embedded_corpus(tmp_path):
  run_train(tmp_path, '--config.model.attention=moba', '--config.data.source=stdlib',
            '--config.model.moba.block_size=16', '--config.model.moba.top_k=2', '--config.train.steps=25')
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.8


def test_hybrid_runs_its_last_layers_dense_and_counts_them_so():
  c = tiny_config(attention='moba', moba={'block_size': 4, 'top_k': 2, 'dense_last_layers': 1})
  model = Transformer(c.model, rngs=nnx.Rngs(0))
  assert type(model.blocks[0].attn) is moba.Attention and type(model.blocks[1].attn) is dense.Attention
  T = c.data.seq_len
  want = (moba.Attention.attended_keys(c.model, T) + dense.Attention.attended_keys(c.model, T)) / 2
  assert flops.flops_per_token(c)['attended_keys_per_query'] == pytest.approx(want)
  c.model.moba.dense_last_layers = 3
  with pytest.raises(ConfigError, match=r'model.moba.dense_last_layers=3 must be an integer in 0..'):
    checks.check_model(c.model)
