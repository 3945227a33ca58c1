"""Flash attention: both kernel bodies (interpreted) against the XLA reference, forward and gradients; the
reference against a per-position loop and against jax.nn.dot_product_attention; causality and window
through gradients; lowering of the compiled bodies for cuda and tpu; and the rejected shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (
  attention_with_lse_reference,
  flash_attention,
  flash_attention_reference,
)

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _inputs(seed, B, T, S, H, K, D, dtype=jnp.float32):
  """q, k, v and a cotangent for the output, standard normal."""
  rng = np.random.default_rng(seed)
  shapes = [(B, T, H, D), (B, S, K, D), (B, S, K, D), (B, T, H, D)]
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _value_and_grads(f, q, k, v, do):
  o, vjp = jax.vjp(f, q, k, v)
  return (o, *vjp(do))


# backend, (B, T, S, H, K, D), causal, window, dtype, (block_q, block_k)
CASES = [
    ('gpu', (2, 128, 128, 2, 2, 32), True, None, jnp.float32, (32, 64)),
    ('gpu', (1, 100, 100, 4, 2, 16), True, 24, jnp.bfloat16, (64, 64)),
    ('gpu', (1, 100, 72, 8, 1, 16), False, None, jnp.float32, (64, 32)),
    ('gpu', (1, 40, 130, 4, 2, 32), True, 50, jnp.float32, (16, 32)),
    ('gpu', (1, 96, 96, 8, 1, 64), True, None, jnp.bfloat16, (None, None)),
    ('tpu', (1, 100, 100, 4, 2, 16), True, None, jnp.float32, (64, 64)),
    ('tpu', (1, 128, 128, 8, 1, 32), True, 24, jnp.bfloat16, (64, 32)),
    ('tpu', (1, 72, 100, 2, 2, 16), False, None, jnp.float32, (32, 64)),
]


@pytest.mark.parametrize('backend,shape,causal,window,dtype,blocks', CASES)
def test_kernel_matches_reference(backend, shape, causal, window, dtype, blocks):
  seed = _seed()
  q, k, v, do = _inputs(seed, *shape, dtype=dtype)
  options = dict(causal=causal, window=window)
  kernel = functools.partial(flash_attention, **options, block_q=blocks[0], block_k=blocks[1],
                             backend=backend, interpret=True)
  reference = functools.partial(flash_attention_reference, **options)
  got = jax.jit(functools.partial(_value_and_grads, kernel))(q, k, v, do)
  want = _value_and_grads(reference, q, k, v, do)
  tol = 2e-5 if dtype == jnp.float32 else 5e-2
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want, strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol,
                               err_msg=f'{name}, seed={seed}')


def _naive_attention(q, k, v, *, causal, window, sm_scale):
  """One query position and head at a time, float64, positions as the module docstring defines them."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, H, D = q.shape
  S, K = k.shape[1:3]
  o = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      pos = t + (S - T if causal else 0)
      keys = [s for s in range(S) if not causal or (s <= pos and (window is None or s > pos - window))]
      for h in range(H):
        kh = h // (H // K)
        logits = np.array([q[b, t, h] @ k[b, s, kh] * sm_scale for s in keys])
        p = np.exp(logits - logits.max())
        o[b, t, h] = (p / p.sum()) @ v[b, keys, kh]
  return o


@pytest.mark.parametrize('T,S,causal,window', [(13, 13, True, None), (13, 13, True, 4), (9, 16, True, 5),
                                                (9, 16, False, None)])
def test_reference_matches_per_position_loop(T, S, causal, window):
  seed = _seed()
  q, k, v, _ = _inputs(seed, 2, T, S, 4, 2, 8)
  got = flash_attention_reference(q, k, v, causal=causal, window=window, sm_scale=0.3)
  want = _naive_attention(q, k, v, causal=causal, window=window, sm_scale=0.3)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f'seed={seed}')


def test_matches_jax_dot_product_attention():
  seed = _seed()
  window = 20
  q, k, v, _ = _inputs(seed, 2, 80, 80, 4, 2, 16)
  # window w keeps t - w < s <= t: w - 1 keys to the left of the query, none to the right.
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(window - 1, 0),
                                      implementation='xla')
  for impl in ('xla', 'pallas'):
    got = flash_attention(q, k, v, causal=True, window=window, block_q=32, block_k=32, implementation=impl)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5,
                               err_msg=f'{impl}, seed={seed}')


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_gradient_reaches_only_the_window(backend):
  """The output at t depends on keys t - w < s <= t only: every other k/v gradient is exactly zero, so
  neither causality nor the window leaks through a skipped or partly masked block."""
  seed = _seed()
  T, window = 100, 30
  q, k, v, do = _inputs(seed, 1, T, T, 4, 2, 16)
  t = int(np.random.default_rng(seed).integers(window, T))
  do = jnp.zeros_like(do).at[:, t].set(do[:, t])
  f = functools.partial(flash_attention, causal=True, window=window, block_q=32, block_k=64, backend=backend)
  _, dq, dk, dv = _value_and_grads(f, q, k, v, do)
  inside = (np.arange(T) > t - window) & (np.arange(T) <= t)
  for name, g in (('dk', dk), ('dv', dv)):
    g = np.abs(np.asarray(g)).sum(axis=(0, 2, 3))
    assert np.all(g[~inside] == 0), f'{name} leaks outside ({t - window}, {t}], t={t}, seed={seed}'
    assert np.all(g[inside] > 0), f'{name} misses keys inside the window, t={t}, seed={seed}'
  assert np.all(np.asarray(dq)[:, np.arange(T) != t] == 0), f't={t}, seed={seed}'


def _lowered_text(backend, platform, *, causal, window, H, K, D, segments=False):
  """Lowers forward and backward with the compiled kernel body (interpret=False) for `platform`."""
  q = jax.ShapeDtypeStruct((2, 256, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 256, K, D), jnp.bfloat16)
  seg = jnp.asarray(np.repeat([1, 2, 3, 0], 64)[None].repeat(2, 0), jnp.int32) if segments else None
  f = functools.partial(flash_attention, causal=causal, window=window, backend=backend, interpret=False,
                        segment_ids=seg)

  def fwd_and_bwd(q, k, v):
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(o)

  return jax.jit(fwd_and_bwd).trace(q, kv, kv).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
@pytest.mark.parametrize('causal,window,H,K,D,segments', [(True, 100, 8, 2, 128, False),
                                                          (False, None, 4, 4, 64, False),
                                                          (True, None, 8, 2, 64, True)])
def test_compiled_bodies_lower(backend, platform, causal, window, H, K, D, segments):
  text = _lowered_text(backend, platform, causal=causal, window=window, H=H, K=K, D=D, segments=segments)
  for name in ('flash_attention_fwd', 'flash_attention_dq', 'flash_attention_dkv'):
    assert name in text, name


@pytest.mark.parametrize('shapes,options,match', [
    (((1, 8, 3, 16), (1, 8, 2, 16)), {}, 'H % K'),
    (((1, 8, 2, 16), (1, 8, 2, 32)), {}, 'head dim'),
    (((1, 16, 2, 16), (1, 8, 2, 16)), {}, 'T <= S'),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {'causal': False, 'window': 4}, 'window'),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {'window': 0}, 'window'),
    (((1, 8, 2, 32), (1, 8, 2, 32)), {'interpret': False}, 'D=32'),
    (((1, 8, 2, 32), (1, 8, 2, 32)), {'interpret': False, 'backend': 'tpu'}, 'D=32'),
    (((1, 8, 2, 160), (1, 8, 2, 160)), {}, 'D=160'),
    (((1, 256, 2, 64), (1, 256, 2, 64)), {'interpret': False, 'block_q': 48}, 'power of two'),
    (((1, 256, 2, 64), (1, 256, 2, 64)), {'interpret': False, 'backend': 'tpu', 'block_k': 64}, '128'),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {'block_k': 12}, 'multiple of 8'),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {'implementation': 'cuda'}, 'implementation'),
    (((1, 8, 2, 16), (1, 8, 2, 16)), {'backend': 'cuda'}, 'backend'),
])
def test_rejects_what_it_cannot_run(shapes, options, match):
  q_shape, kv_shape = shapes
  q, k = jnp.zeros(q_shape), jnp.zeros(kv_shape)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, k, **options)


def test_rejects_mixed_dtypes():
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  k = jnp.zeros((1, 8, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match='dtypes'):
    flash_attention(q, k, k)


# ----------------------------------------------------------------------------------------------------
# Segments: packed documents


def _packed_segments(rng, B, T, *, padding: bool = True):
  """Segment ids of rows packed with documents of random lengths (some shorter than a block, some
  starting mid-block), the last run padding (0) in some rows."""
  rows = []
  for _ in range(B):
    cuts = np.sort(rng.choice(np.arange(1, T), size=int(rng.integers(1, 7)), replace=False))
    row = np.searchsorted(cuts, np.arange(T), side='right') + 1
    if padding and rng.random() < 0.5:
      row[row == row.max()] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


# backend, (B, T, H, K, D), window, dtype, (block_q, block_k)
SEGMENT_CASES = [
    ('gpu', (2, 128, 4, 2, 16), None, jnp.float32, (32, 32)),
    ('gpu', (2, 100, 2, 1, 32), 24, jnp.float32, (16, 32)),
    ('gpu', (1, 96, 4, 2, 16), None, jnp.bfloat16, (32, 16)),
    ('tpu', (2, 128, 4, 2, 16), None, jnp.float32, (32, 32)),
    ('tpu', (1, 100, 2, 2, 16), 24, jnp.float32, (64, 32)),
]


@pytest.mark.parametrize('backend,shape,window,dtype,blocks', SEGMENT_CASES)
def test_segments_kernel_matches_reference(backend, shape, window, dtype, blocks):
  seed = _seed()
  B, T, H, K, D = shape
  q, k, v, do = _inputs(seed, B, T, T, H, K, D, dtype=dtype)
  seg = _packed_segments(np.random.default_rng(seed), B, T)
  kernel = functools.partial(flash_attention, window=window, block_q=blocks[0], block_k=blocks[1],
                             backend=backend, interpret=True, segment_ids=seg)
  reference = functools.partial(flash_attention_reference, window=window, segment_ids=seg)
  got = jax.jit(functools.partial(_value_and_grads, kernel))(q, k, v, do)
  want = _value_and_grads(reference, q, k, v, do)
  tol = 2e-5 if dtype == jnp.float32 else 5e-2
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol, rtol=tol,
                               err_msg=f'{name}, seed={seed}')


@pytest.mark.parametrize('impl', ['xla', 'pallas'])
def test_each_segment_gets_what_it_gets_alone(impl):
  """Outputs and gradients of each document of a packed row equal those of the document run alone."""
  rng = np.random.default_rng(_seed())
  lengths = [5, 40, 1, 22, 60]  # shorter than a block, starting mid-block, one token
  T = sum(lengths)
  q, k, v, do = _inputs(int(rng.integers(1 << 30)), 1, T, T, 4, 2, 16)
  seg = jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)
  f = functools.partial(flash_attention, block_q=16, block_k=16, implementation=impl, interpret=True)
  packed = jax.jit(functools.partial(_value_and_grads, functools.partial(f, segment_ids=seg)))(q, k, v, do)
  start = 0
  for n in lengths:
    piece = slice(start, start + n)
    alone = jax.jit(functools.partial(_value_and_grads, f))(*(x[:, piece] for x in (q, k, v, do)))
    for name, g, w in zip(('o', 'dq', 'dk', 'dv'), packed, alone, strict=True):
      np.testing.assert_allclose(g[:, piece], w, atol=2e-5, rtol=2e-5, err_msg=f'{name}, length {n}')
    start += n


def test_sixteen_documents_cost_a_sixteenth_of_one():
  """The tiles the kernels compute (their own loop bounds) for a row of sixteen 512-token documents at
  T=8,192 against one document: the causal triangle of each document instead of the whole row's."""
  from pallas_kernels.flash_attention import computed_tiles  # pylint: disable=g-import-not-at-top
  T, blocks = 8192, dict(block_q=128, block_k=128)
  one = computed_tiles(T, **blocks)
  sixteen = computed_tiles(T, **blocks, segment_ids=jnp.asarray(np.repeat(np.arange(1, 17), 512)[None]))
  assert one == 64 * 65 // 2 and sixteen == 16 * (4 * 5 // 2)
  assert sixteen / one < 1 / 10
  assert computed_tiles(T, **blocks, segment_ids=jnp.ones((1, T), jnp.int32)) == one


@pytest.mark.parametrize('window', [5, 16, 40])
def test_windowed_reference_with_segments_equals_the_general_path(window):
  """The XLA path's sliding window in chunks (linear in T) keeps to segments as the per-query path does."""
  rng = np.random.default_rng(_seed())
  B, T, H, K, D = 2, 100, 4, 2, 8
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((B, T, H, D), (B, T, K, D),
                                                                        (B, T, K, D)))
  seg = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [30, 13, 50, 7]), np.repeat([1, 2], [64, 36])]),
                    jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  chunked = attention_with_lse_reference(q, k, v, window=window, segment_ids=seg)
  general = attention_with_lse_reference(q, k, v, window=window, segment_ids=seg, qpos_BT=positions,
                                         kpos_BS=positions)  # explicit positions: per-query masks
  for got, want in zip(chunked, general, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
