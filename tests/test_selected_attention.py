"""NSA selected-block attention: the XLA reference against a per-token loop, both kernel bodies (interpreted,
the TPU one under InterpretParams) against the reference forward and backward, causality, padding, the
empty-selection rule, lowering for cuda and tpu, and the shape errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selected_attention import selected_attention, selected_attention_reference

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _block_lists(rng, B, T, K, n, L):
  """NSA-like lists: the first and the current block always present, the rest random earlier blocks,
  with repeats, -1 slots and the odd block that starts after the token; slot order shuffled."""
  NB = -(-T // L)
  idx = np.empty((B, T, K, n), np.int32)
  for b, t, h in np.ndindex(B, T, K):
    rest = rng.integers(0, t // L + 1, n - 2)
    rest = np.where(rng.random(n - 2) < 0.2, -1, rest)
    rest = np.where(rng.random(n - 2) < 0.1, rng.integers(0, NB, n - 2), rest)
    idx[b, t, h] = rng.permutation(np.concatenate([[0, t // L], rest]))
  return idx


def _inputs(rng, B, T, H, K, D, n, L, dtype):
  q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, T, H, D), (B, T, K, D), (B, T, K, D)))
  return q, k, v, jnp.asarray(_block_lists(rng, B, T, K, n, L))


def _loop_reference(q, k, v, idx, L):
  """Per token, per head: softmax over the set of listed keys at positions <= t, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  idx = np.asarray(idx)
  B, T, H, D = q.shape
  G = H // k.shape[2]
  o = np.zeros_like(q)
  for b, t, hq in np.ndindex(B, T, H):
    blocks = {int(j) for j in idx[b, t, hq // G] if j >= 0}
    keys = [s for j in sorted(blocks) for s in range(j * L, (j + 1) * L) if s <= t]
    if keys:
      s = k[b, keys, hq // G] @ q[b, t, hq] / np.sqrt(D)
      p = np.exp(s - s.max())
      o[b, t, hq] = p @ v[b, keys, hq // G] / p.sum()
  return o


def test_reference_matches_per_token_loop():
  seed = _seed()
  rng = np.random.default_rng(seed)
  L = 4
  q, k, v, idx = _inputs(rng, 2, 22, 4, 2, 8, 4, L, jnp.float32)  # T not a multiple of L
  idx = idx.at[0, 5, 1].set(-1)  # one query that selects nothing
  got = selected_attention_reference(q, k, v, idx, block_size=L)
  np.testing.assert_allclose(got, _loop_reference(q, k, v, idx, L), atol=1e-5, rtol=1e-5, err_msg=f'{seed=}')


def _vjp(f):
  """Output and all three gradients for a cotangent, jitted as one program (interpret mode runs far
  faster compiled whole than op by op)."""
  def run(q, k, v, do):
    o, pullback = jax.vjp(f, q, k, v)
    return (o, *pullback(do))
  return jax.jit(run)


# (backend, H, K, T, block_size, dtype): GQA ratios 1, 2 and 8; T=40 is not a multiple of block_size=16.
CASES = [
    ('gpu', 2, 2, 64, 16, jnp.float32),
    ('gpu', 4, 2, 40, 16, jnp.bfloat16),
    ('gpu', 8, 1, 48, 8, jnp.float32),
    ('tpu', 4, 2, 40, 16, jnp.float32),
    ('tpu', 8, 1, 32, 8, jnp.bfloat16),
]


@pytest.mark.parametrize('backend,H,K,T,L,dtype', CASES)
def test_kernel_matches_reference(backend, H, K, T, L, dtype):
  seed = _seed()
  rng = np.random.default_rng(seed)
  q, k, v, idx = _inputs(rng, 2, T, H, K, 16, 5, L, dtype)
  do = jnp.asarray(rng.standard_normal(q.shape), dtype)
  kernel = functools.partial(selected_attention, block_indices_BTKn=idx, block_size=L, backend=backend,
                             interpret=True)
  reference = functools.partial(selected_attention_reference, block_indices_BTKn=idx, block_size=L)
  got = _vjp(kernel)(q, k, v, do)
  # bfloat16 is checked against the float32 reference on the same (rounded) inputs.
  up = functools.partial(jnp.asarray, dtype=jnp.float32)
  want = _vjp(reference)(up(q), up(k), up(v), up(do))
  tol = 2e-5 if dtype == jnp.float32 else 2e-2
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want, strict=True):
    assert g.dtype == dtype, name
    err = float(jnp.max(jnp.abs(up(g) - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1.0))
    assert err < tol, f'{name}: relative error {err:.2e} ({backend}, {dtype.__name__}, {seed=})'


def test_causal_and_empty_selection():
  """Output t has exactly zero gradient w.r.t. k/v after t; a query that sees nothing outputs 0 and
  passes no gradient."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  T, L = 32, 8
  q, k, v, idx = _inputs(rng, 1, T, 4, 2, 16, 4, L, jnp.float32)
  empty = 13
  idx = idx.at[0, empty, 0].set(jnp.asarray([-1, 3, -1, 3]))  # only a block that starts after the token
  grads = _vjp(functools.partial(selected_attention, block_indices_BTKn=idx, block_size=L, interpret=True))
  for t in (empty, 21):
    do = jnp.zeros_like(q).at[0, t].set(jnp.asarray(rng.standard_normal(q.shape[2:]), jnp.float32))
    o, dq, dk, dv = grads(q, k, v, do)
    assert not np.any(np.asarray(o[0, empty, :2])), f'{seed=}'
    assert not np.any(np.asarray(dk[0, t + 1:])) and not np.any(np.asarray(dv[0, t + 1:])), f'{t=} {seed=}'
    assert np.any(np.asarray(dk[0, :t + 1])), f'{t=} {seed=}'
    if t == empty:  # heads 0 and 1 (kv group 0) of this token see nothing
      assert not np.any(np.asarray(dq[0, t, :2])) and not np.any(np.asarray(dk[0, :, 0])), f'{seed=}'


@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_forward_and_backward(backend, platform, dtype):
  B, T, H, K, D, L, n = 1, 512, 8, 2, 128, 64, 4
  q = jnp.zeros((B, T, H, D), dtype)
  kv = jnp.zeros((B, T, K, D), dtype)
  idx = jnp.zeros((B, T, K, n), jnp.int32)
  f = functools.partial(selected_attention, block_indices_BTKn=idx, block_size=L, backend=backend,
                        interpret=False)
  grads = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))
  for fn in (f, grads):
    jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=(platform,))


def test_shape_errors():
  q = jnp.zeros((1, 32, 4, 16))
  kv = jnp.zeros((1, 32, 2, 16))
  idx = jnp.zeros((1, 32, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match='block_indices'):
    selected_attention(q, kv[:, :16], kv[:, :16], idx, block_size=8)
  with pytest.raises(ValueError, match='block_indices'):
    selected_attention(q, kv, kv, idx[..., :1, :], block_size=8)
  with pytest.raises(ValueError, match='powers of two'):
    selected_attention(q, kv, kv, idx, block_size=12, backend='gpu', interpret=False)
  with pytest.raises(ValueError, match='multiples of 8'):
    selected_attention(q, kv, kv, idx, block_size=12, backend='tpu', interpret=False)
