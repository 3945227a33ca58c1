"""The package's public surface (INTERFACES.md): the kernels and their references by name."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels


def test_package_exposes_the_kernels_and_their_references():
  q_BTHD, k_BSKD, v_BSKD = jax.random.normal(jax.random.key(0), (3, 1, 16, 2, 8))
  close = functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5)
  flash = jax.jit(functools.partial(pallas_kernels.flash_attention, block_q=8, block_k=8))
  close(flash(q_BTHD, k_BSKD, v_BSKD), pallas_kernels.flash_attention_reference(q_BTHD, k_BSKD, v_BSKD))
  idx_BTKn = jnp.zeros((1, 16, 2, 1), jnp.int32)
  selected = functools.partial(pallas_kernels.selected_attention, block_size=8)
  close(jax.jit(selected)(q_BTHD, k_BSKD, v_BSKD, idx_BTKn),
        pallas_kernels.selected_attention_reference(q_BTHD, k_BSKD, v_BSKD, idx_BTKn, block_size=8))
  rules = dict(cmp_block=4, cmp_stride=2)
  ck_BCKD, cv_BCKD = k_BSKD[:, :7], v_BSKD[:, :7]
  compressed = jax.jit(functools.partial(pallas_kernels.compressed_attention, **rules))
  for got, want in zip(compressed(q_BTHD, ck_BCKD, cv_BCKD), pallas_kernels.compressed_attention_reference(
      q_BTHD, ck_BCKD, cv_BCKD, **rules), strict=True):
    close(got, want)
  lse_BHT = pallas_kernels.compressed_attention_reference(q_BTHD, ck_BCKD, cv_BCKD, **rules)[1]
  rules.update(sel_block=4, num_selected=3)
  np.testing.assert_array_equal(
      jax.jit(functools.partial(pallas_kernels.block_selection, **rules))(q_BTHD, ck_BCKD, lse_BHT),
      pallas_kernels.block_selection_reference(q_BTHD, ck_BCKD, lse_BHT, **rules))
  lhs_MK, rhs_GKN = jnp.ones((16, 8)), jnp.ones((2, 8, 8))
  sizes_G = jnp.asarray([10, 6], jnp.int32)
  np.testing.assert_allclose(jax.jit(pallas_kernels.grouped_matmul)(lhs_MK, rhs_GKN, sizes_G),
                             pallas_kernels.grouped_matmul_reference(lhs_MK, rhs_GKN, sizes_G))
  assert callable(pallas_kernels.transposed_grouped_matmul)
  assert callable(pallas_kernels.transposed_grouped_matmul_reference)


def _train_like(kernel_call):
  """Forward and backward of one kernel call, as a train step holds it."""
  return jax.jit(jax.grad(lambda *a: kernel_call(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))


# Shapes the compiled bodies take (head_dim 64, blocks of 64) but small enough to interpret quickly.
_Q, _KV = jnp.zeros((1, 128, 4, 64), jnp.bfloat16), jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
_IDX = jnp.zeros((1, 128, 2, 2), jnp.int32)
_CALLS = {
    'flash_attention': (lambda q, k, v: pallas_kernels.flash_attention(q, k, v), (_Q, _KV, _KV)),
    'selected_attention': (lambda q, k, v: pallas_kernels.selected_attention(q, k, v, _IDX, block_size=64),
                           (_Q, _KV, _KV)),
    'compressed_attention': (lambda q, k, v: pallas_kernels.compressed_attention(
        q, k[:, :7], v[:, :7], cmp_block=32, cmp_stride=16)[0], (_Q, _KV, _KV)),
    'grouped_matmul': (lambda lhs, rhs, _: pallas_kernels.grouped_matmul(lhs, rhs, jnp.asarray([64, 64])),
                       (jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((2, 64, 64), jnp.bfloat16), _KV)),
}


@pytest.mark.parametrize('kernel', sorted(_CALLS))
def test_the_lowering_platform_picks_the_body(kernel):
  """No flags: traced here, a program lowered for cuda holds Triton kernels, for tpu Mosaic kernels, and
  for the CPU the interpreter (no kernel call at all), so compiling a train step for an accelerator from
  this host gets the real kernels."""
  call, args = _CALLS[kernel]
  traced = _train_like(call).trace(*args)
  assert '__gpu$xla.gpu.triton' in traced.lower(lowering_platforms=('cuda',)).as_text()
  assert 'tpu_custom_call' in traced.lower(lowering_platforms=('tpu',)).as_text()
  cpu = traced.lower(lowering_platforms=('cpu',)).as_text()
  assert 'triton' not in cpu and 'tpu_custom_call' not in cpu


def test_a_body_that_cannot_take_the_shapes_refuses_only_where_it_is_lowered():
  """head_dim 16: interpret mode runs it on the CPU; lowering it for cuda names the reason."""
  q, k = jnp.ones((1, 32, 2, 16)), jnp.ones((1, 32, 1, 16))
  traced = _train_like(lambda q, k, v: pallas_kernels.flash_attention(q, k, v, block_q=16, block_k=16)
                       ).trace(q, k, k)
  assert 'tpu_custom_call' not in traced.lower(lowering_platforms=('cpu',)).as_text()
  with pytest.raises(ValueError, match='head dim D=16: the compiled gpu body'):
    traced.lower(lowering_platforms=('cuda',))
