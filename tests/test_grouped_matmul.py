"""Grouped matmul kernels against jax.lax.ragged_dot and a per-group numpy loop, both bodies interpreted;
lowering of the real kernels for cuda and tpu, forward and backward; the errors for bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference, transposed_grouped_matmul

jax.config.update('jax_numpy_rank_promotion', 'raise')

# Small tiles on the GPU body give many row tiles and boundaries straddling them; the TPU body needs
# 128-multiples. M, K, N are no multiples of the tiles, so the padded path always runs.
BODIES = {
    'gpu': dict(backend='gpu', block_m=16, block_k=16, block_n=16),
    'tpu': dict(backend='tpu', block_m=128, block_k=128, block_n=128),
}
SHAPES = {'gpu': (100, 40, 24), 'tpu': (200, 96, 160)}  # M, K, N
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # of the largest reference magnitude


@pytest.fixture
def rng():
  seed = int(np.random.default_rng().integers(2**31))
  print(f'seed={seed}')
  return np.random.default_rng(seed), seed


def split(rng, total, groups):
  return rng.multinomial(total, rng.dirichlet(np.ones(groups))).astype(np.int32)


def group_size_cases(rng, m, groups):
  """Empty groups first, in the middle and last; every row in one group; sum(group_sizes) < M, down to
  no rows at all."""
  holes = split(rng, m, groups)
  holes[0], holes[groups // 2], holes[-1] = 0, 0, 0
  holes[1] += m - holes.sum()
  alone = np.zeros(groups, np.int32)
  alone[rng.integers(groups)] = m
  return {'random': split(rng, m, groups), 'empty_first_middle_last': holes, 'one_group_takes_all': alone,
          'sum_below_m': split(rng, m - int(rng.integers(1, m // 3)), groups),
          'all_empty': np.zeros(groups, np.int32)}


def numpy_grouped_matmul(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for g, (start, end) in enumerate(zip(np.cumsum(sizes) - sizes, np.cumsum(sizes), strict=True)):
    out[start:end] = lhs[start:end] @ rhs[g]
  return out


def numpy_transposed_grouped_matmul(lhs, dout, sizes):
  return np.stack([lhs[start:end].T @ dout[start:end]
                   for start, end in zip(np.cumsum(sizes) - sizes, np.cumsum(sizes), strict=True)])


def f64(x):
  return np.asarray(x, np.float64)


def assert_close(got, want, dtype, what):
  got, want = f64(got), f64(want)
  scale = max(np.abs(want).max(), 1.0)
  err = np.abs(got - want).max()
  assert err <= TOLERANCE[dtype] * scale, f'{what}: max error {err:.3g} at scale {scale:.3g}'


def value_and_grads(fn, lhs, rhs, sizes, dout):
  out, vjp = jax.vjp(lambda lhs, rhs: fn(lhs, rhs, sizes), lhs, rhs)
  return (out, *vjp(dout))


def inputs(rng, m, k, n, groups, dtype):
  lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
  rhs = jnp.asarray(rng.standard_normal((groups, k, n)), dtype)
  dout = jnp.asarray(rng.standard_normal((m, n)), dtype)
  return lhs, rhs, dout


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('body', ['gpu', 'tpu'])
def test_matches_ragged_dot_and_numpy(rng, body, dtype):
  rng, seed = rng
  (m, k, n), groups = SHAPES[body], 6
  lhs, rhs, dout = inputs(rng, m, k, n, groups, dtype)
  kernel = jax.jit(lambda *a: value_and_grads(
      lambda lhs, rhs, sizes: grouped_matmul(lhs, rhs, sizes, interpret=True, **BODIES[body]), *a))
  reference = jax.jit(lambda *a: value_and_grads(grouped_matmul_reference, *a))
  for case, sizes in group_size_cases(rng, m, groups).items():
    got = kernel(lhs, rhs, jnp.asarray(sizes), dout)
    want = reference(lhs, rhs, jnp.asarray(sizes), dout)
    loop = (numpy_grouped_matmul(f64(lhs), f64(rhs), sizes),
            numpy_grouped_matmul(f64(dout), f64(rhs).transpose(0, 2, 1), sizes),
            numpy_transposed_grouped_matmul(f64(lhs), f64(dout), sizes))
    for name, g, w, l in zip(('out', 'd_lhs', 'd_rhs'), got, want, loop, strict=True):
      what = f'{body} {case} sizes={sizes.tolist()} seed={seed} {name}'
      assert g.dtype == w.dtype, what
      assert_close(g, w, dtype, what + ' vs ragged_dot')
      assert_close(g, l, dtype, what + ' vs numpy loop')


@pytest.mark.parametrize('body', ['gpu', 'tpu'])
def test_single_group(rng, body):
  rng, seed = rng
  (m, k, n), sizes = SHAPES[body], jnp.asarray([SHAPES[body][0]], jnp.int32)
  lhs, rhs, dout = inputs(rng, m, k, n, 1, jnp.float32)
  kernel = jax.jit(lambda *a: grouped_matmul(*a, interpret=True, **BODIES[body]))
  got = value_and_grads(kernel, lhs, rhs, sizes, dout)
  want = value_and_grads(grouped_matmul_reference, lhs, rhs, sizes, dout)
  for name, g, w in zip(('out', 'd_lhs', 'd_rhs'), got, want, strict=True):
    assert_close(g, w, jnp.float32, f'{body} single group seed={seed} {name}')


@pytest.mark.parametrize('body', ['gpu', 'tpu'])
def test_transposed_grouped_matmul(rng, body):
  """Empty groups must come back as zeros, not as whatever the output buffer held."""
  rng, seed = rng
  (m, k, n), groups = SHAPES[body], 5
  lhs, _, dout = inputs(rng, m, k, n, groups, jnp.float32)
  sizes = group_size_cases(rng, m, groups)['empty_first_middle_last']
  got = transposed_grouped_matmul(lhs, dout, jnp.asarray(sizes), interpret=True, **BODIES[body])
  assert got.shape == (groups, k, n)
  assert_close(got, numpy_transposed_grouped_matmul(f64(lhs), f64(dout), sizes), jnp.float32,
               f'{body} sizes={sizes.tolist()} seed={seed}')
  assert not np.any(np.asarray(got)[sizes == 0])
  xla = transposed_grouped_matmul(lhs, dout, jnp.asarray(sizes), implementation='xla')
  assert_close(got, xla, jnp.float32, f'{body} vs xla seed={seed}')


def test_bfloat16_inputs_float32_output(rng):
  rng, seed = rng
  (m, k, n), groups = SHAPES['gpu'], 4
  lhs, rhs, _ = inputs(rng, m, k, n, groups, jnp.bfloat16)
  dout = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  sizes = jnp.asarray(split(rng, m - 7, groups))
  kernel = jax.jit(lambda *a: grouped_matmul(*a, preferred_element_type=jnp.float32, interpret=True,
                                             **BODIES['gpu']))
  got = value_and_grads(kernel, lhs, rhs, sizes, dout)
  want = value_and_grads(lambda *a: grouped_matmul_reference(*a, preferred_element_type=jnp.float32),
                         lhs, rhs, sizes, dout)
  for name, g, w in zip(('out', 'd_lhs', 'd_rhs'), got, want, strict=True):
    assert g.dtype == w.dtype, f'{name}: {g.dtype} != {w.dtype}'
    assert_close(g, w, jnp.bfloat16, f'sizes={sizes.tolist()} seed={seed} {name}')


def test_xla_implementation_is_ragged_dot(rng):
  rng, _ = rng
  lhs, rhs, _ = inputs(rng, 32, 8, 16, 3, jnp.float32)
  sizes = jnp.asarray([10, 0, 20], jnp.int32)
  np.testing.assert_array_equal(grouped_matmul(lhs, rhs, sizes, implementation='xla'),
                                jax.lax.ragged_dot(lhs, rhs, sizes))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_lowers(backend, platform, dtype):
  """The real kernels (default blocks), forward and both gradients, lower for the device."""
  m, k, n, groups = 512, 256, 384, 4
  args = (jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((groups, k, n), dtype),
          jax.ShapeDtypeStruct((groups,), jnp.int32))

  def forward(lhs, rhs, sizes):
    return grouped_matmul(lhs, rhs, sizes, interpret=False, backend=backend)

  def loss(lhs, rhs, sizes):
    return forward(lhs, rhs, sizes).astype(jnp.float32).sum()

  for fn in (forward, jax.grad(loss, argnums=(0, 1))):
    jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize('body', ['gpu', 'tpu'])
def test_bad_arguments_raise(body):
  lhs, rhs, sizes = jnp.zeros((16, 8)), jnp.zeros((2, 8, 4)), jnp.asarray([8, 8], jnp.int32)
  bad_block = dict(block_m=24) if body == 'gpu' else dict(block_m=64)
  with pytest.raises(ValueError, match='block_m'):
    grouped_matmul(lhs, rhs, sizes, backend=body, **bad_block)
  with pytest.raises(ValueError, match='disagree on K'):
    grouped_matmul(lhs, jnp.zeros((2, 6, 4)), sizes, backend=body)
  with pytest.raises(ValueError, match='groups but rhs has'):
    grouped_matmul(lhs, rhs, jnp.asarray([16], jnp.int32), backend=body)
  with pytest.raises(ValueError, match='integer'):
    grouped_matmul(lhs, rhs, jnp.asarray([8.0, 8.0]), backend=body)
  with pytest.raises(ValueError, match='disagree on M'):
    transposed_grouped_matmul(lhs, jnp.zeros((15, 4)), sizes, backend=body)
  with pytest.raises(ValueError, match='backend'):
    grouped_matmul(lhs, rhs, sizes, backend='cpu')
  with pytest.raises(ValueError, match='implementation'):
    grouped_matmul(lhs, rhs, sizes, implementation='triton')
