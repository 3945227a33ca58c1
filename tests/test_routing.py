"""Routing attention: the kernel path against the XLA path, causality (the faithful top-k leaks,
routing_causal does not), balanced clusters, the EMA centroids, decoding, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.attention import routing
from tests.conftest import (
  eval_lines,
  fresh_seed,
  run_train,
  tiny_config,
  train_losses,
)


def _config(attention, kernel='xla', **routing_overrides):
  c = tiny_config(attention=attention, kernel=kernel)
  c.model.routing.update({'num_heads': 2, 'num_clusters': 4, 'window': 6, **routing_overrides})
  return c


def _layer(attention, kernel='xla', seed=0, **routing_overrides):
  cls = {'routing': routing.Attention, 'routing_causal': routing.CausalAttention}[attention]
  return cls(_config(attention, kernel, **routing_overrides).model, rngs=nnx.Rngs(seed))


def _apply(layer, x_BTD, update_state=False):
  pos_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
  return layer(x_BTD, pos_BT, update_state=update_state)[0]


@pytest.mark.parametrize('attention', ['routing', 'routing_causal'])
def test_pallas_path_equals_xla_path(attention):
  seed = fresh_seed()
  xla, pallas = (_layer(attention, kernel, seed) for kernel in ('xla', 'pallas'))
  x_BTD = jax.random.normal(jax.random.key(seed), (2, 16, 64))

  def loss(layer, x_BTD):
    return jnp.mean(_apply(layer, x_BTD) ** 2)
  value_and_grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
  (lx, (gx, dx)), (lp, (gp, dp)) = (value_and_grad(m, x_BTD) for m in (xla, pallas))
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  np.testing.assert_allclose(dp, dx, atol=1e-6, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gp), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4)
  assert np.abs(np.asarray(gx['routing_wqk'])).sum() > 0


def _future_change(layer, x_BTD, t):
  other_BTD = x_BTD.at[:, t + 1:].set(jax.random.normal(jax.random.key(fresh_seed()), x_BTD[:, t + 1:].shape))
  apply = nnx.jit(_apply)
  return float(jnp.max(jnp.abs(apply(layer, x_BTD)[:, :t + 1] - apply(layer, other_BTD)[:, :t + 1])))


def test_faithful_routing_leaks_the_future():
  layer = _layer('routing', seed=fresh_seed())
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  assert _future_change(layer, x_BTD, 15) > 1e-4  # discrete choices: invisible to gradients


def test_routing_causal_never_depends_on_later_inputs():
  layer = _layer('routing_causal', seed=fresh_seed())
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  grad_at = nnx.jit(nnx.grad(lambda m, x, t: jnp.sum(_apply(m, x)[:, t] ** 2), argnums=1))
  for t in (0, 17):
    g_BTD = np.asarray(grad_at(layer, x_BTD, t))
    assert np.all(g_BTD[:, t + 1:] == 0.0), f'position {t} sees the future'
    assert np.all(np.abs(g_BTD[:, t]).sum(-1) > 0)
    assert _future_change(layer, x_BTD, t) == 0.0


def test_faithful_clusters_are_balanced():
  layer = _layer('routing', num_clusters=4)
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  _, _, score_BRCT = layer._route_inputs(x_BTD)
  idx_BGS = np.asarray(layer._clusters(score_BRCT, jnp.broadcast_to(jnp.arange(32), (2, 32))))
  assert idx_BGS.shape == (2, 2 * 4, 32 // 4)
  for row in idx_BGS.reshape(-1, 8):
    assert len(set(row)) == 8 and np.all(np.diff(row) > 0) and row.max() < 32


def test_centroids_move_by_ema_and_stay_unit():
  layer = _layer('routing', decay=0.9)
  before_RCH = np.asarray(layer.centroids[...])
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64))
  qk_BTRH = np.asarray(routing._unit(jnp.einsum('btd,drh->btrh', x_BTD, layer.routing_wqk[...])))
  nearest_BTR = np.argmax(np.einsum('btrh,rch->btrc', qk_BTRH, before_RCH), axis=-1)
  _apply(layer, x_BTD, update_state=True)
  after_RCH = np.asarray(layer.centroids[...])
  for r in range(2):
    for c in range(4):
      members = qk_BTRH[:, :, r][nearest_BTR[:, :, r] == c]
      if len(members):
        want = 0.9 * before_RCH[r, c] + 0.1 * members.mean(0)
        np.testing.assert_allclose(after_RCH[r, c], want / np.linalg.norm(want), atol=1e-5)
      else:
        np.testing.assert_array_equal(after_RCH[r, c], before_RCH[r, c])
  for _ in range(20):
    _apply(layer, jax.random.normal(jax.random.key(fresh_seed()), (2, 32, 64)), update_state=True)
  mu_RCH = np.asarray(layer.centroids[...])
  assert np.all(np.isfinite(mu_RCH)) and np.allclose(np.linalg.norm(mu_RCH, axis=-1), 1, atol=1e-5)
  assert not np.allclose(mu_RCH, before_RCH)


def test_centroids_are_state_not_parameters():
  layer = _layer('routing')
  assert 'centroids' not in nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert not routing.Attention.causal and routing.CausalAttention.causal


@pytest.mark.parametrize('attention', ['routing', 'routing_causal'])
def test_routing_trains_on_the_embedded_corpus(tmp_path, attention):
  run_train(tmp_path, f'--config.model.attention={attention}', '--config.data.source=stdlib',
            '--config.train.steps=25', '--config.model.routing.window=8')
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.8
  assert {line['causal'] for line in eval_lines(tmp_path)} == {attention == 'routing_causal'}
