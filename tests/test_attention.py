"""The XLA attention path (`flash_attention_reference`: explicit positions, and windows in chunks)
against a naive reference, and recomputation in the backward for every
variant. Causality, decoding and pallas-against-xla for every variant are in tests/test_variants.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.flash_attention import attention_with_lse_reference, flash_attention_reference
from sparse_lm.attention import REGISTRY
from sparse_lm.model import Transformer
from tests.conftest import assert_same_loss_and_grads, fresh_seed, tiny_config


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
def test_xla_path_at_explicit_positions_matches_naive_reference(heads, kv_heads, window):
  rng = np.random.default_rng()
  B, T, D = 2, 11, 8
  q = rng.standard_normal((B, T, heads, D))
  k, v = rng.standard_normal((2, B, T, kv_heads, D))
  pos_BT = np.broadcast_to(np.arange(T), (B, T))
  # Explicit positions (the decoding path): every key at its own position.
  got = flash_attention_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                  jnp.asarray(v, jnp.float32), window=window, qpos_BT=pos_BT, kpos_BS=pos_BT)
  np.testing.assert_allclose(got, naive_attention(q, k, v, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('T,window', [(17, 4), (16, 4), (9, 20), (33, 7)])
def test_xla_window_in_chunks_matches_naive_reference(T, window):
  rng = np.random.default_rng()
  q = rng.standard_normal((2, T, 4, 8))
  k, v = rng.standard_normal((2, 2, T, 2, 8))
  got = flash_attention_reference(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), window=window)
  np.testing.assert_allclose(got, naive_attention(q, k, v, window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('window', [None, 5])
def test_xla_path_in_query_chunks_equals_the_whole_with_gradients(window):
  """Output, log-sum-exp and gradients are the same whether the queries run in chunks of 8 (or, with a
  window, chunk by chunk of the window) or all at once against every key at explicit positions."""
  rng = np.random.default_rng(fresh_seed())
  B, T = 2, 37
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, 8)), jnp.float32) for h in (4, 2, 2))
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))

  def chunked(q, k, v):
    return attention_with_lse_reference(q, k, v, window=window, chunk=8)

  def whole(q, k, v):
    return attention_with_lse_reference(q, k, v, window=window, qpos_BT=pos_BT, kpos_BS=pos_BT, chunk=T)

  def loss_and_grads(f):
    def loss(q, k, v):
      o, lse = f(q, k, v)
      return jnp.sum(o * o) + jnp.sum(lse)
    return (*f(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
  for got, want in zip(loss_and_grads(chunked), loss_and_grads(whole), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(REGISTRY))
def test_recomputing_attention_in_the_backward_changes_no_number(name):
  """model.remat_attention runs each attention sublayer's forward again in the backward: loss and
  gradients stay the same for every variant (the memory it saves is measured in benchmarks/)."""
  seed = fresh_seed()
  configs = [tiny_config(attention=name, **REGISTRY[name].tiny_config(), remat_attention=remat).model
             for remat in (False, True)]
  models = [Transformer(c, rngs=nnx.Rngs(seed)) for c in configs]
  tokens_BT = jax.random.randint(jax.random.key(seed), (2, 64), 0, 259)
  assert_same_loss_and_grads(*models, tokens_BT, loss_rtol=1e-6, atol=1e-6, rtol=1e-5)
