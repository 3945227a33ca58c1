"""Attention to listed tokens (DSA's selection): the reference against a per-token loop, the Triton body
interpreted against the reference forward and backward (groups padded to 16 rows, keys per step, lists
longer than a step, repeats, later positions, empty lists), the inverse map, lowering for cuda, the
refusal on tpu, and the argument errors."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.token_attention import token_attention, token_attention_reference

# the module, which the package's function of the same name hides from `from pallas_kernels import ...`
ta = importlib.import_module('pallas_kernels.token_attention')

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _lists(rng, B, T, K, n):
  """Random earlier positions with repeats, -1 slots and the odd later position; row 0 of batch 0
  lists nothing it may see (an empty list)."""
  idx = rng.integers(0, np.arange(1, T + 1)[None, :, None, None], (B, T, K, n))
  idx = np.where(rng.random(idx.shape) < 0.15, -1, idx)
  idx = np.where(rng.random(idx.shape) < 0.1, rng.integers(0, T, idx.shape), idx)
  idx[..., 1] = idx[..., 0]
  idx[0, 0] = -1
  return jnp.asarray(idx, jnp.int32)


def _inputs(rng, B, T, H, K, D, n):
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, T, H, D), (B, T, K, D),
                                                                      (B, T, K, D)))
  return q, k, v, _lists(rng, B, T, K, n)


def test_reference_matches_per_token_loop():
  seed = _seed()
  rng = np.random.default_rng(seed)
  q, k, v, idx = _inputs(rng, 2, 20, 4, 2, 8, 6)
  got = np.asarray(token_attention_reference(q, k, v, idx, chunk=7))
  qn, kn, vn, idxn = (np.asarray(x, np.float64) for x in (q, k, v, idx))
  for b, t, h in np.ndindex(2, 20, 4):
    keys = sorted({int(s) for s in idxn[b, t, h // 2] if 0 <= s <= t})
    want = np.zeros(8)
    if keys:
      s = kn[b, keys, h // 2] @ qn[b, t, h] / np.sqrt(8)
      p = np.exp(s - s.max())
      want = p @ vn[b, keys, h // 2] / p.sum()
    np.testing.assert_allclose(got[b, t, h], want, atol=1e-5, err_msg=f'seed {seed}, (b, t, h)={b, t, h}')


@pytest.mark.parametrize('B,T,H,K,D,n,block_k,shared', [
    (2, 37, 4, 2, 16, 12, 4, False),  # group of 2 padded to 16 rows, lists of 3 steps, T % block_k != 0
    (1, 64, 3, 1, 16, 40, 16, False),  # group of 3, lists longer than a step
    (1, 48, 2, 2, 8, 5, 32, False),    # one query head per group, 32-bit masks
    (2, 37, 8, 4, 16, 12, 8, True),    # one list [B, T, 1, n] shared by 4 kv groups (DSA's indexer)
])
def test_kernel_matches_reference_forward_and_backward(B, T, H, K, D, n, block_k, shared):
  seed = _seed()
  q, k, v, idx = _inputs(np.random.default_rng(seed), B, T, H, K, D, n)
  if shared:
    idx = idx[:, :, :1]
  w = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((B, T, H, D)), jnp.float32)
  # The reference is given a list per group, copied, so the shared path is checked against the plain one.
  idx_per_group = jnp.asarray(np.repeat(np.asarray(idx), K // idx.shape[2], axis=2))

  def loss(f, lists):
    return lambda q, k, v: jnp.sum(w * f(q, k, v, lists))
  kernel = lambda *a: token_attention(*a, interpret=True, block_k=block_k)  # noqa: E731
  np.testing.assert_allclose(kernel(q, k, v, idx), token_attention_reference(q, k, v, idx_per_group),
                             atol=1e-5, err_msg=f'seed {seed}')
  got = jax.grad(loss(kernel, idx), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(token_attention_reference, idx_per_group), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip('qkv', got, want, strict=True):
    np.testing.assert_allclose(g, r, atol=2e-5, err_msg=f'd{name}, seed {seed}')
  assert float(jnp.abs(got[0][0, 0]).max()) == 0.0  # the empty list: zero output, zero gradient
  np.testing.assert_array_equal(kernel(q, k, v, idx)[0, 0], 0.0)
  if shared:  # the reference takes shared lists too
    np.testing.assert_allclose(token_attention_reference(q, k, v, idx),
                               token_attention_reference(q, k, v, idx_per_group), atol=1e-6)


def test_kernel_is_causal_through_gradients():
  """Lists naming later positions: no gradient reaches a key after its query's position."""
  rng = np.random.default_rng(_seed())
  q, k, v, _ = _inputs(rng, 1, 24, 2, 1, 16, 8)
  idx = jnp.asarray(rng.integers(0, 24, (1, 24, 1, 8)), jnp.int32)  # half of them in the future
  t = 9
  def out_t(k, v):
    return jnp.sum(token_attention(q, k, v, idx, interpret=True)[:, t])
  dk, dv = jax.grad(out_t, argnums=(0, 1))(k, v)
  assert float(jnp.abs(dk[:, t + 1:]).max()) == 0.0 and float(jnp.abs(dv[:, t + 1:]).max()) == 0.0
  assert float(jnp.abs(dv[:, :t + 1]).max()) > 0


def test_inverse_map_lists_each_listed_key_once():
  rng = np.random.default_rng(_seed())
  idx = _lists(rng, 1, 30, 2, 7)
  lists, count = ta._lists(idx, 8)
  tok, bits, start = (np.asarray(x) for x in ta._inverse_map(lists, 30 // 4 + 1, 4, 3))
  for h in range(2):
    pairs = set()
    for j in range(start.shape[-1] - 1):
      for p in range(start[0, h, j], start[0, h, j + 1]):
        pairs |= {(int(tok[0, h, p]), j * 4 + c) for c in range(4) if bits[0, h, p] >> c & 1}
    want = {(t, int(s)) for t in range(30) for s in np.asarray(lists)[0, h, t] if s >= 0}
    assert pairs == want
    assert np.all(np.asarray(count)[0, h] == np.sum(np.asarray(lists)[0, h] >= 0, axis=-1))


def test_lowers_for_cuda_and_refuses_tpu_in_one_line():
  q, k, v, idx = _inputs(np.random.default_rng(0), 1, 64, 2, 1, 16, 32)
  def grad(*args):
    return jax.grad(lambda q: jnp.sum(token_attention(q, *args, interpret=False)))(q)
  text = jax.jit(grad).trace(k, v, idx).lower(lowering_platforms=('cuda',)).as_text()
  assert 'token_attention_dkdv' in text and 'token_attention_fwd' in text
  with pytest.raises(ValueError, match='no TPU body'):
    jax.jit(lambda q: token_attention(q, k, v, idx)).trace(q).lower(lowering_platforms=('tpu',))


@pytest.mark.parametrize('kwargs,match', [
    (dict(block_k=33), 'block_k=33 must be in 1..32'),
    (dict(implementation='triton'), "implementation='triton'"),
])
def test_bad_arguments_fail_in_one_line(kwargs, match):
  q, k, v, idx = _inputs(np.random.default_rng(0), 1, 8, 2, 1, 8, 4)
  with pytest.raises(ValueError, match=match):
    token_attention(q, k, v, idx, **kwargs)
  with pytest.raises(ValueError, match='token_indices'):
    token_attention(q, k, v, idx[:, :4])
