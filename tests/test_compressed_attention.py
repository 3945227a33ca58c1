"""Compressed attention (NSA's first branch): both kernel bodies (interpreted) against the XLA reference,
output, log-sum-exp and their gradients; the reference against a per-query loop of Eq. 8; the chunked
reference against the whole one at arbitrary positions; queries that see no block; and that the XLA path's
compiled memory grows linearly with the sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compressed_attention import compressed_attention, compressed_attention_reference

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _inputs(seed, B, T, H, K, D, l, d, dtype=jnp.float32):
  """q, compressed k and v, and cotangents for the output and the log-sum-exp."""
  C = max(0, (T - l) // d + 1)
  rng = np.random.default_rng(seed)
  shapes = [(B, T, H, D), (B, C, K, D), (B, C, K, D)]
  q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
  return q, k, v, jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32), jnp.asarray(
      rng.standard_normal((B, H, T)), jnp.float32)


def _value_and_grads(f, q, k, v, do, dlse):
  """Output, lse, and the gradients of <o, do> + <lse, dlse> (lse -inf rows left out)."""
  def loss(q, k, v):
    o, lse = f(q, k, v)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(jnp.where(lse > -jnp.inf, lse, 0.0) * dlse), (o, lse)
  (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return (o, lse, *grads)


# backend, (B, T, H, K, D), (cmp_block, cmp_stride), dtype, (block_q, block_k)
CASES = [
    ('gpu', (2, 200, 4, 2, 16), (32, 16), jnp.float32, (32, 16)),   # T not a multiple of anything
    ('gpu', (1, 96, 6, 2, 32), (8, 4), jnp.bfloat16, (64, 16)),     # G = 3
    ('gpu', (1, 64, 2, 2, 16), (16, 8), jnp.float32, (16, 16)),     # early query blocks see nothing
    ('tpu', (1, 333, 4, 1, 16), (32, 16), jnp.float32, (128, 128)),
    ('tpu', (1, 256, 8, 2, 32), (16, 8), jnp.bfloat16, (128, 128)),
]


@pytest.mark.parametrize('backend,shape,blocks,dtype,tiles', CASES)
def test_kernel_matches_reference(backend, shape, blocks, dtype, tiles):
  seed = _seed()
  l, d = blocks
  args = _inputs(seed, *shape, l, d, dtype=dtype)
  kernel = functools.partial(compressed_attention, cmp_block=l, cmp_stride=d, block_q=tiles[0],
                             block_k=tiles[1], backend=backend, interpret=True)
  reference = functools.partial(compressed_attention_reference, cmp_block=l, cmp_stride=d)
  got = jax.jit(functools.partial(_value_and_grads, kernel))(*args)
  want = _value_and_grads(reference, *args)
  tol = 2e-5 if dtype == jnp.float32 else 5e-2
  for name, g, w in zip(('o', 'lse', 'dq', 'dk', 'dv'), got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol,
                               err_msg=f'{name}, seed={seed}')


# Documents of 64, 40 (not a multiple of the stride: blocks past its end belong to the next one), 104,
# 3 and 45 tokens in row 0 and two halves in row 1.
_LENGTHS = ((64, 40, 104, 3, 45), (128, 128))


@pytest.mark.parametrize('backend,tiles', [('gpu', (32, 16)), ('tpu', (128, 128))])
def test_kernel_with_segments_matches_reference(backend, tiles):
  """A query sees only the blocks that begin in its segment: the kernels (which also skip the key tiles
  before it) against the reference, forward and backward, and the reference against a per-query mask."""
  seed = _seed()
  l, d = 8, 4
  seg = jnp.asarray(np.stack([np.repeat(np.arange(1, len(n) + 1), n) for n in _LENGTHS]), jnp.int32)
  args = _inputs(seed, 2, 256, 4, 2, 16, l, d)
  kernel = functools.partial(compressed_attention, cmp_block=l, cmp_stride=d, block_q=tiles[0],
                             block_k=tiles[1], backend=backend, interpret=True, segment_ids=seg)
  reference = functools.partial(compressed_attention_reference, cmp_block=l, cmp_stride=d, segment_ids=seg)
  got = jax.jit(functools.partial(_value_and_grads, kernel))(*args)
  want = _value_and_grads(reference, *args)
  for name, g, w in zip(('o', 'lse', 'dq', 'dk', 'dv'), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=f'{name} {seed=}')
  # The mask itself: block c is seen by query t iff it ends by t and begins at or after t's segment start.
  q, k, v = args[:3]
  C = k.shape[1]
  start = np.asarray(jax.vmap(lambda s: jnp.searchsorted(s, s, side='left'))(seg))
  seen = ((np.arange(C)[None, None] * d + l - 1 <= np.arange(256)[None, :, None])
          & (np.arange(C)[None, None] * d >= start[:, :, None]))
  s_BTHC = np.einsum('bthd,bchd->bthc', np.asarray(q), np.repeat(np.asarray(k), 2, axis=2)) * 16**-0.5
  s_BTHC = np.where(seen[:, :, None], s_BTHC, -np.inf)
  with np.errstate(invalid='ignore'):
    lse = np.log(np.exp(s_BTHC).sum(-1)).transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(want[1]), lse, atol=1e-5, rtol=1e-5)


def test_reference_is_eq_8_per_query():
  """Each query's softmax over exactly the blocks whose last token is at or before it."""
  l, d, T = 8, 4, 30
  q, k, v, _, _ = _inputs(_seed(), 1, T, 2, 1, 8, l, d)
  o, lse = compressed_attention_reference(q, k, v, cmp_block=l, cmp_stride=d)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  for t in range(T):
    visible = [i for i in range(k.shape[1]) if i * d + l - 1 <= t]
    for h in range(2):
      if not visible:
        assert np.all(np.asarray(o[0, t, h]) == 0) and lse[0, h, t] == -np.inf
        continue
      s = k[0, visible, 0] @ q[0, t, h] / np.sqrt(8)
      want_lse = np.log(np.sum(np.exp(s - s.max()))) + s.max()
      np.testing.assert_allclose(lse[0, h, t], want_lse, rtol=1e-5, atol=1e-6)  # lse can be ~0
      np.testing.assert_allclose(o[0, t, h], np.exp(s - want_lse) @ v[0, visible, 0], atol=1e-5)


def test_chunked_reference_equals_whole_at_any_positions():
  l, d, T = 16, 8, 90
  q, k, v, do, dlse = _inputs(_seed(), 2, T, 4, 2, 16, l, d)
  pos_BT = jnp.asarray(np.sort(np.random.default_rng(_seed()).integers(0, 3 * T, (2, T)), axis=1))
  whole = functools.partial(compressed_attention_reference, cmp_block=l, cmp_stride=d, pos_BT=pos_BT,
                            chunk=T)
  chunked = functools.partial(compressed_attention_reference, cmp_block=l, cmp_stride=d, pos_BT=pos_BT,
                              chunk=16)
  for g, w in zip(_value_and_grads(chunked, q, k, v, do, dlse), _value_and_grads(whole, q, k, v, do, dlse),
                  strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_queries_that_see_no_block_get_zeros_and_no_gradient(implementation):
  l, d, T = 32, 16, 48  # queries 0..30 see nothing, 31..46 one block, 47 two
  q, k, v, do, dlse = _inputs(_seed(), 1, T, 2, 1, 16, l, d)
  f = functools.partial(compressed_attention, cmp_block=l, cmp_stride=d, implementation=implementation,
                        interpret=True)
  o, lse, dq, _, _ = _value_and_grads(f, q, k, v, do, dlse)
  assert np.all(np.asarray(o[:, :l - 1]) == 0) and np.all(np.asarray(dq[:, :l - 1]) == 0)
  assert np.all(np.asarray(lse[..., :l - 1]) == -np.inf) and np.all(np.isfinite(np.asarray(lse[..., l - 1:])))
  assert np.all(np.abs(np.asarray(dq[:, l - 1:])).sum(-1) > 0)


def test_sequence_shorter_than_a_block():
  q, k, v, _, _ = _inputs(_seed(), 1, 20, 2, 1, 16, 32, 16)
  assert k.shape[1] == 0
  o, lse = compressed_attention(q, k, v, cmp_block=32, cmp_stride=16, interpret=True)
  assert np.all(np.asarray(o) == 0) and np.all(np.asarray(lse) == -np.inf)


def _compiled_temp_bytes(T: int) -> int:
  """XLA's temporary memory for the gradient of the chunked XLA path at T queries (CPU compile)."""
  l, d, H, D = 32, 16, 4, 32
  C = (T - l) // d + 1
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((1, T, H, D), (1, C, 1, D), (1, C, 1, D))]

  def loss(q, k, v):
    o, lse = compressed_attention_reference(q, k, v, cmp_block=l, cmp_stride=d)
    return jnp.sum(o) + jnp.sum(jnp.where(lse > -jnp.inf, lse, 0.0))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_xla_path_memory_grows_linearly():
  """4x the queries (and so 4x the compressed blocks) takes at most 4.5x the temporary memory: the
  `[T, C]` scores never exist whole, forward or backward (whole, they would grow 16x)."""
  small, large = _compiled_temp_bytes(4096), _compiled_temp_bytes(16384)
  assert large <= 4.5 * small, (small, large)
