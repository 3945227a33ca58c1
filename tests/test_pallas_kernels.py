"""The package's public surface (INTERFACES.md): the three kernels and their references by name."""

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels


def test_package_exposes_the_kernels_and_their_references():
  q_BTHD, k_BSKD, v_BSKD = jax.random.normal(jax.random.key(0), (3, 1, 16, 2, 8))
  out = pallas_kernels.flash_attention(q_BTHD, k_BSKD, v_BSKD, block_q=8, block_k=8)
  np.testing.assert_allclose(out, pallas_kernels.flash_attention_reference(q_BTHD, k_BSKD, v_BSKD),
                             atol=1e-5, rtol=1e-5)
  idx_BTKn = jnp.zeros((1, 16, 2, 1), jnp.int32)
  out = pallas_kernels.selected_attention(q_BTHD, k_BSKD, v_BSKD, idx_BTKn, block_size=8)
  np.testing.assert_allclose(
      out, pallas_kernels.selected_attention_reference(q_BTHD, k_BSKD, v_BSKD, idx_BTKn, block_size=8),
      atol=1e-5, rtol=1e-5)
  lhs_MK, rhs_GKN = jnp.ones((16, 8)), jnp.ones((2, 8, 8))
  sizes_G = jnp.asarray([10, 6], jnp.int32)
  np.testing.assert_allclose(pallas_kernels.grouped_matmul(lhs_MK, rhs_GKN, sizes_G),
                             pallas_kernels.grouped_matmul_reference(lhs_MK, rhs_GKN, sizes_G))
  assert callable(pallas_kernels.transposed_grouped_matmul)
  assert callable(pallas_kernels.transposed_grouped_matmul_reference)
