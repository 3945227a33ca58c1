"""NSA selected-block attention: the XLA reference against a per-token loop, both kernel bodies (interpreted,
the TPU one under InterpretParams) against the reference forward and backward, causality, padding, the
empty-selection rule, lowering for cuda and tpu, and the shape errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

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


# (backend, H, K, T, block_size, block_k, dtype): GQA ratios 1, 2 and 8; T=40 is not a multiple of
# block_size=16; the GPU bodies walk blocks in steps of block_k keys, fewer or more than a tile's block_q
# tokens (8 at H/K=2, 16 at 1), and skip the steps after a tile's last token.
CASES = [
    ('gpu', 2, 2, 64, 16, None, jnp.float32),
    ('gpu', 2, 2, 64, 16, 4, jnp.float32),
    ('gpu', 4, 2, 40, 16, 8, jnp.bfloat16),
    ('gpu', 8, 1, 48, 8, None, jnp.float32),
    ('gpu', 4, 2, 72, 32, 16, jnp.float32),
    ('tpu', 4, 2, 40, 16, None, jnp.float32),
    ('tpu', 8, 1, 32, 8, None, jnp.bfloat16),
]


@pytest.mark.parametrize('backend,H,K,T,L,bk,dtype', CASES)
def test_kernel_matches_reference(backend, H, K, T, L, bk, dtype):
  seed = _seed()
  rng = np.random.default_rng(seed)
  q, k, v, idx = _inputs(rng, 2, T, H, K, 16, 5, L, dtype)
  do = jnp.asarray(rng.standard_normal(q.shape), dtype)
  kernel = functools.partial(selected_attention, block_indices_BTKn=idx, block_size=L, backend=backend,
                             interpret=True, block_k=bk)
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


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_shared_lists_equal_lists_per_group(backend):
  """`[B, T, 1, n]` lists (DSA's one indexer for all kv groups) are the same as that list per group."""
  rng = np.random.default_rng(_seed())
  q, k, v, idx = _inputs(rng, 1, 32, 4, 2, 16, 4, 8, jnp.float32)
  shared = idx[:, :, :1]
  f = functools.partial(selected_attention, block_size=8, backend=backend, interpret=True)
  got = _vjp(lambda q, k, v: f(q, k, v, shared))(q, k, v, q)
  want = _vjp(lambda q, k, v: f(q, k, v, jnp.repeat(shared, 2, axis=2)))(q, k, v, q)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(g, w)
  np.testing.assert_allclose(selected_attention_reference(q, k, v, shared, block_size=8), got[0], atol=1e-5)


def test_shape_errors():
  q = jnp.zeros((1, 32, 4, 16))
  kv = jnp.zeros((1, 32, 2, 16))
  idx = jnp.zeros((1, 32, 2, 3), jnp.int32)
  with pytest.raises(ValueError, match='block_indices'):
    selected_attention(q, kv[:, :16], kv[:, :16], idx, block_size=8)
  with pytest.raises(ValueError, match='block_indices'):
    selected_attention(q, kv, kv, jnp.zeros((1, 32, 3, 3), jnp.int32), block_size=8)
  with pytest.raises(ValueError, match='block_k=16 to divide block_size=8'):
    selected_attention(q, kv, kv, idx, block_size=8, block_k=16, interpret=True, backend='gpu')
  with pytest.raises(ValueError, match='powers of two'):
    selected_attention(q, kv, kv, idx, block_size=12, backend='gpu', interpret=False)
  with pytest.raises(ValueError, match='multiples of 8'):
    selected_attention(q, kv, kv, idx, block_size=12, backend='tpu', interpret=False)


# ----------------------------------------------------------------------------- TPU body: chunked tables


def _assert_matches_reference(got, q, k, v, idx, do, L, context):
  """Output and gradients against the float32 reference on the same (rounded) inputs."""
  up = functools.partial(jnp.asarray, dtype=jnp.float32)
  reference = functools.partial(selected_attention_reference, block_indices_BTKn=idx, block_size=L)
  want = _vjp(reference)(up(q), up(k), up(v), up(do))
  tol = 2e-5 if q.dtype == jnp.float32 else 2e-2
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want, strict=True):
    assert g.dtype == q.dtype, name
    err = float(jnp.max(jnp.abs(up(g) - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1.0))
    assert err < tol, f'{name}: relative error {err:.2e} ({context})'


# (H, K, dtype, table entries E) at B=2, T=36 (not a multiple of block_size=8) and block_q=4: NT=10 query
# tiles per (b, h), U=5 union slots, W=B*K*NT work items. A call takes Wc=(E-1)//(U+1) items (forward, dq)
# or Pc=(E-2)//2 (tile, block) pairs (dk/dv). Every token lists block 0, so the first dk/dv run (block 0 of
# b=0, h=0) has NT=10 pairs and, with Pc < 10, straddles a call boundary.
TPU_CHUNK_CASES = [
    (2, 2, jnp.float32, 20),  # GQA 1: Wc=3, 14 calls for W=40, the last overlapping the one before; Pc=9
    (6, 3, jnp.float32, 14),  # GQA 2: Wc=2, 30 calls for W=60; Pc=6
    (8, 2, jnp.bfloat16, 8),  # GQA 4: Wc=1, one item per call; Pc=3
]


@pytest.mark.parametrize('H,K,dtype,entries', TPU_CHUNK_CASES)
def test_tpu_chunked_tables_match_reference(H, K, dtype, entries):
  """The TPU body cut into many calls by a small `tpu_table_entries` still matches the reference, with a
  query tile and a whole (b, h) that see nothing."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  T, L, G = 36, 8, H // K
  q, k, v, idx = _inputs(rng, 2, T, H, K, 16, 5, L, dtype)
  idx = idx.at[0, 8:12, 1].set(-1)  # query tile 2 of (b=0, h=1): an item with no slots, no pairs
  idx = idx.at[1, :, 0].set(-1)  # (b=1, h=0): no pairs at all
  do = jnp.asarray(rng.standard_normal(q.shape), dtype)
  kernel = functools.partial(selected_attention, block_indices_BTKn=idx, block_size=L, backend='tpu',
                             interpret=True, block_q=4, tpu_table_entries=entries)
  o, dq, dk, dv = got = _vjp(kernel)(q, k, v, do)
  _assert_matches_reference(got, q, k, v, idx, do, L, f'{H=} {K=} {entries=} {seed=}')
  assert not np.any(np.asarray(o[1, :, :G])) and not np.any(np.asarray(dq[1, :, :G])), f'{seed=}'
  assert not np.any(np.asarray(dk[1, :, 0])) and not np.any(np.asarray(dv[1, :, 0])), f'{seed=}'


def test_tpu_nothing_selected_runs_no_dkdv_call():
  """With every list empty there is no (tile, block) pair, so the dk/dv loop runs zero calls."""
  q = jnp.ones((1, 16, 2, 8))
  kv = jnp.ones((1, 16, 1, 8))
  idx = jnp.full((1, 16, 1, 3), -1, jnp.int32)
  kernel = functools.partial(selected_attention, block_indices_BTKn=idx, block_size=8, backend='tpu',
                             interpret=True, tpu_table_entries=8)
  for x in _vjp(kernel)(q, kv, kv, q):
    assert not np.any(np.asarray(x))


def _prefetch_sizes(jaxpr):
  """The scalar-prefetch operand sizes of every pallas_call in `jaxpr` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      yield sum(v.aval.size for v in eqn.invars[:eqn.params['grid_mapping'].num_index_operands])
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, ClosedJaxpr):
          yield from _prefetch_sizes(sub.jaxpr)
        elif isinstance(sub, Jaxpr):
          yield from _prefetch_sizes(sub)


@pytest.mark.parametrize('entries', [None, 1000])
def test_tpu_prefetch_fits_table_budget(entries):
  """SMEM bound, traced only: at B=8, T=131072 (whole tables of 3.4e7 entries) no TPU call prefetches more
  than `tpu_table_entries` int32."""
  B, T, H, K, D, n = 8, 131072, 8, 2, 128, 16
  q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16)
  idx = jax.ShapeDtypeStruct((B, T, K, n), jnp.int32)
  budget = {} if entries is None else {'tpu_table_entries': entries}

  def loss(q, k, v, idx):
    return selected_attention(q, k, v, idx, block_size=64, backend='tpu', interpret=False,
                              **budget).astype(jnp.float32).sum()
  sizes = list(_prefetch_sizes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv, idx).jaxpr))
  assert len(sizes) == 3 and max(sizes) <= (entries or 16384), sizes


def test_tpu_chunks_lower_in_shard_map():
  """Inside `shard_map` (check_vma) the chunk loops carry outputs that vary over the manual axes, as the
  kernels' outputs do; the TPU body, forward and backward, traces and lowers for tpu there."""
  mesh = jax.make_mesh((1,), ('data',))
  B, T, H, K, D, n = 2, 256, 8, 2, 128, 4
  shard = functools.partial(jax.device_put, device=jax.sharding.NamedSharding(mesh, jax.P('data')))
  q, kv = shard(jnp.zeros((B, T, H, D), jnp.bfloat16)), shard(jnp.zeros((B, T, K, D), jnp.bfloat16))
  idx = shard(jnp.zeros((B, T, K, n), jnp.int32))
  kernel = functools.partial(selected_attention, block_size=64, backend='tpu', interpret=False,
                             tpu_table_entries=1000)

  def loss(q, k, v, idx):
    o = jax.shard_map(kernel, mesh=mesh, in_specs=(jax.P('data'),) * 4, out_specs=jax.P('data'))(q, k, v, idx)
    return o.astype(jnp.float32).sum()
  jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, idx).lower(lowering_platforms=('tpu',))
