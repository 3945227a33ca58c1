"""Attention variants: against a naive reference, causal through gradients, and decoding from the
cache equal to the parallel forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.attention import REGISTRY, core
from sparse_lm.model import Transformer
from tests.conftest import assert_decoding_equals_parallel, fresh_seed, tiny_config

VARIANTS = [('dense', {}), ('sliding_window', {'window': 5})]


def naive_attention(q_BTHD, k_BSKD, v_BSKD, window):
  """Repeats K/V per query head and loops over positions: slow and obviously right."""
  B, T, H, D = q_BTHD.shape
  rep = H // k_BSKD.shape[2]
  k_BSHD, v_BSHD = np.repeat(k_BSKD, rep, axis=2), np.repeat(v_BSKD, rep, axis=2)
  out = np.zeros((B, T, H, D), np.float64)
  for t in range(T):
    lo = max(0, t - window + 1) if window else 0
    s_BHS = np.einsum('bhd,bshd->bhs', q_BTHD[:, t], k_BSHD[:, lo:t + 1]) / np.sqrt(D)
    p_BHS = np.exp(s_BHS - s_BHS.max(-1, keepdims=True))
    p_BHS /= p_BHS.sum(-1, keepdims=True)
    out[:, t] = np.einsum('bhs,bshd->bhd', p_BHS, v_BSHD[:, lo:t + 1])
  return out


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize('window', [None, 3])
def test_attend_matches_naive_reference(heads, kv_heads, window):
  rng = np.random.default_rng()
  B, T, D = 2, 11, 8
  q = rng.standard_normal((B, T, heads, D))
  k, v = rng.standard_normal((2, B, T, kv_heads, D))
  pos_BT = np.broadcast_to(np.arange(T), (B, T))
  got = core.attend(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                    jnp.asarray(v, jnp.float32), pos_BT, pos_BT, window=window)
  np.testing.assert_allclose(got, naive_attention(q, k, v, window), atol=2e-5, rtol=2e-5)


def _model(attention, **extra):
  cfg = tiny_config(attention=attention, **extra).model
  return Transformer(cfg, rngs=nnx.Rngs(fresh_seed()))


@pytest.mark.parametrize('attention,extra', VARIANTS)
def test_output_never_depends_on_later_inputs(attention, extra):
  model = _model(attention, **extra)
  B, T = 2, 16
  x_BTD = jax.random.normal(jax.random.key(fresh_seed()), (B, T, 64))
  # One compilation for every t: t is traced, not static.
  grad_at = nnx.jit(nnx.grad(lambda m, x, t: jnp.sum(m.from_embeddings(x)[0][:, t, :259] ** 2), argnums=1))
  for t in (0, 6, T - 2):
    g_BTD = np.asarray(grad_at(model, x_BTD, t))
    assert np.all(g_BTD[:, t + 1:] == 0.0), f'position {t} sees the future'
    assert np.all(np.abs(g_BTD[:, t]).sum(-1) > 0), 'position sees itself'


@pytest.mark.parametrize('attention,extra', VARIANTS)
def test_incremental_decoding_equals_parallel_forward(attention, extra):
  cache = assert_decoding_equals_parallel(_model(attention, **extra), T=14, P=5)
  assert int(cache['end']) == 14


@pytest.mark.parametrize('T,window', [(17, 4), (16, 4), (9, 20), (33, 7)])
def test_local_attend_matches_naive_reference(T, window):
  rng = np.random.default_rng()
  q = rng.standard_normal((2, T, 4, 8))
  k, v = rng.standard_normal((2, 2, T, 2, 8))
  got = core.local_attend(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), window=window)
  np.testing.assert_allclose(got, naive_attention(q, k, v, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('attention,extra', VARIANTS)
def test_pallas_kernel_path_equals_xla_path(attention, extra):
  seed = fresh_seed()
  models = [Transformer(tiny_config(attention=attention, kernel=kernel, **extra).model, rngs=nnx.Rngs(seed))
            for kernel in ('xla', 'pallas')]
  tokens_BT = jax.random.randint(jax.random.key(seed), (2, 20), 0, 259)
  _assert_same_loss_and_grads(*models, tokens_BT, loss_rtol=1e-5, atol=1e-5, rtol=1e-4)


def _assert_same_loss_and_grads(model_a, model_b, tokens_BT, *, loss_rtol, atol, rtol):
  def loss(model):
    return jnp.mean(model(tokens_BT)[0][..., :259] ** 2)
  (loss_a, grads_a), (loss_b, grads_b) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (model_a, model_b))
  np.testing.assert_allclose(loss_b, loss_a, rtol=loss_rtol)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
    np.testing.assert_allclose(gb, ga, atol=atol, rtol=rtol)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_recomputing_attention_in_the_backward_changes_no_number(name):
  """model.remat_attention runs each attention sublayer's forward again in the backward: loss and
  gradients stay the same for every variant (the memory it saves is measured in benchmarks/)."""
  seed = fresh_seed()
  configs = [tiny_config(attention=name, window=16, remat_attention=remat).model for remat in (False, True)]
  models = [Transformer(c, rngs=nnx.Rngs(seed)) for c in configs]
  tokens_BT = jax.random.randint(jax.random.key(seed), (2, 64), 0, 259)
  _assert_same_loss_and_grads(*models, tokens_BT, loss_rtol=1e-6, atol=1e-6, rtol=1e-5)
