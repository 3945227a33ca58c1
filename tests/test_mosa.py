"""Mixture of Sparse Attention: the isoFLOP rule, the kernel path against the XLA path, causality (the
faithful top-k leaks, mosa_causal does not), memory linear in k, the threshold, decoding, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import flops, ladder, sweep
from sparse_lm.attention import mosa
from tests.conftest import (
  eval_lines,
  fresh_seed,
  run_train,
  tiny_config,
  train_losses,
)


def _config(attention, kernel='xla', **mosa_overrides):
  c = tiny_config(attention=attention, kernel=kernel)
  c.model.mosa.update({'num_heads': 6, 'sparsity': 4, **mosa_overrides})
  return c


def _layer(attention, kernel='xla', seed=0, **mosa_overrides):
  cls = {'mosa': mosa.Attention, 'mosa_causal': mosa.CausalAttention}[attention]
  return cls(_config(attention, kernel, **mosa_overrides).model, rngs=nnx.Rngs(seed))


def _apply(layer, x_BTD):
  pos_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
  return layer(x_BTD, pos_BT)[0]


def test_isoflop_heads_reproduce_the_papers_tiny_model():
  assert mosa.isoflop_heads(512, 64, dense_heads=9, seq_len=1024, sparsity=64, kept_dense_heads=4) == 505
  # FLOPs of the MoSA layer at that count stay within the dense layer's.
  sparse = 4 * mosa.dense_head_flops(512, 64, 1024) + 505 * mosa.mosa_head_flops(512, 64, 1024, 64)
  assert sparse <= 9 * mosa.dense_head_flops(512, 64, 1024)
  assert sparse + mosa.mosa_head_flops(512, 64, 1024, 64) > 9 * mosa.dense_head_flops(512, 64, 1024)


@pytest.mark.parametrize('attention', ['mosa', 'mosa_causal'])
def test_pallas_path_equals_xla_path(attention):
  seed = fresh_seed()
  xla, pallas = (_layer(attention, kernel, seed, include_first=True, num_heads=3)
                 for kernel in ('xla', 'pallas'))
  x_BTD = jax.random.normal(jax.random.key(seed), (2, 16, 64))

  def loss(layer, x_BTD):
    return jnp.mean(_apply(layer, x_BTD) ** 2)
  value_and_grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  (lx, (gx, dx)), (lp, (gp, dp)) = (value_and_grad(m, x_BTD) for m in (xla, pallas))
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  np.testing.assert_allclose(dp, dx, atol=1e-6, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gp), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
  assert np.abs(np.asarray(gx['mosa_router'])).sum() > 0  # the router learns through the score


def _future_change(layer, x_BTD, t):
  """How much outputs at or before t move when every input after t is replaced."""
  other_BTD = x_BTD.at[:, t + 1:].set(jax.random.normal(jax.random.key(fresh_seed()), x_BTD[:, t + 1:].shape))
  apply = nnx.jit(_apply)
  return float(jnp.max(jnp.abs(apply(layer, x_BTD)[:, :t + 1] - apply(layer, other_BTD)[:, :t + 1])))


def test_faithful_mosa_leaks_the_future():
  layer = _layer('mosa', seed=fresh_seed())
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  # The top-k is discrete, so gradients do not see the leak; replacing the future does.
  assert _future_change(layer, x_BTD, 15) > 1e-4


def test_mosa_causal_never_depends_on_later_inputs():
  layer = _layer('mosa_causal', seed=fresh_seed(), include_first=True)
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  grad_at = nnx.jit(nnx.grad(lambda m, x, t: jnp.sum(_apply(m, x)[:, t] ** 2), argnums=1))
  for t in (0, 17):
    g_BTD = np.asarray(grad_at(layer, x_BTD, t))
    assert np.all(g_BTD[:, t + 1:] == 0.0), f'position {t} sees the future'
    assert np.all(np.abs(g_BTD[:, t]).sum(-1) > 0)
    assert _future_change(layer, x_BTD, t) == 0.0


def test_sparse_heads_memory_grows_with_k_not_t():
  """No intermediate of the MoSA heads, forward or backward, is larger than the layer's input [B, T, D]:
  a [B, heads, k, T] gather (27,648 here) or anything [.., T, T] would be."""
  layer = _layer('mosa', sparsity=8)
  T = 192  # k = 24 tokens for each of 6 heads
  x_BTD = jnp.zeros((1, T, 64))
  pos_BT = jnp.arange(T)[None]

  def sparse(x_BTD):
    logits_BMT = layer._router_logits(x_BTD)
    return layer._sparse_heads(x_BTD, pos_BT, logits_BMT, layer._select(logits_BMT, pos_BT))
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(sparse(x))))(x_BTD)  # faithful: sows nothing
  shapes = [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]
  assert all(np.prod(s) <= x_BTD.size for s in shapes), [s for s in shapes if np.prod(s) > x_BTD.size]


def test_threshold_moves_toward_the_target_share():
  layer = _layer('mosa_causal', sparsity=4, threshold_rate=0.2)
  layer.threshold[...] = jnp.full_like(layer.threshold[...], -2.0)  # far too many tokens taken
  x_BTD = jax.random.normal(jax.random.key(0), (4, 64, 64))
  logits_BMT = layer._router_logits(x_BTD)
  pos_BT = jnp.broadcast_to(jnp.arange(64), (4, 64))
  for _ in range(60):
    layer._taken(logits_BMT, pos_BT, update_state=True)
  share_M = np.mean(np.asarray(logits_BMT > layer.threshold[...][None, :, None]), axis=(0, 2))
  np.testing.assert_allclose(share_M, 0.25, atol=0.05)


@pytest.mark.parametrize('rung', ['100k', '1m', '10m', '100m'])
@pytest.mark.parametrize('causal', [False, True])
def test_ladder_mosa_spends_at_most_the_dense_flops(rung, causal):
  """The ladder's isoFLOP rule, with grouped K/V and causal attention counted as `sparse_lm.flops` counts
  them: the MoSA model's FLOPs per token stay within the dense rung's, and one more head would not."""
  assert not mosa.Attention.causal and mosa.CausalAttention.causal
  dense = ladder.dense_config(rung)
  c = ladder.mosa_config(rung, causal=causal)
  total = lambda config: flops.flops_per_token(sweep.with_vocab(config))['flops_per_token']['total']  # noqa: E731
  assert total(c) <= total(dense)
  c.model.mosa.num_heads += 1
  assert total(c) > total(dense)


@pytest.mark.parametrize('attention', ['mosa', 'mosa_causal'])
def test_mosa_trains_on_the_embedded_corpus(tmp_path, attention):
  run_train(tmp_path, f'--config.model.attention={attention}', '--config.data.source=stdlib',
            '--config.train.steps=25', '--config.model.mosa.num_heads=6', '--config.model.mosa.sparsity=4')
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.8
  assert {line['causal'] for line in eval_lines(tmp_path)} == {attention == 'mosa_causal'}


def test_causal_ranks_match_the_sequential_rule():
  rng = np.random.default_rng(fresh_seed())
  taken_BGT = rng.random((3, 4, 40)) < 0.6
  count_BG = rng.integers(0, 3, (3, 4))
  pos_BT = np.broadcast_to(np.arange(5, 45), (3, 40))
  rank, keep = mosa.causal_ranks(jnp.asarray(taken_BGT), jnp.asarray(pos_BT),
                                 jnp.asarray(count_BG, jnp.int32),
                                 per_token=0.3, num_slots=12)
  for b in range(3):
    for g in range(4):
      held = count_BG[b, g]
      for t in range(40):
        bound = min(12, int(np.ceil(0.3 * (pos_BT[b, t] + 1))))
        want = bool(taken_BGT[b, g, t] and held < bound)
        assert bool(keep[b, g, t]) == want
        if want:
          assert int(rank[b, g, t]) == held
          held += 1
