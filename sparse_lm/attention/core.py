"""Masked softmax attention over explicit query and key positions: the XLA reference every variant
that attends over a contiguous key set (dense, sliding window, decoding from a cache) calls."""

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (then ignored) softmax, never NaN


def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, qpos_BT: jax.Array,
           kpos_BS: jax.Array, *, window: int | None = None) -> jax.Array:
  """Grouped-query attention: query `t` sees key `s` when `kpos <= qpos` (and `qpos - kpos < window`).

  The H query heads are viewed as K groups of G, so K/V are never repeated.
  """
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  s_BKGTS = jnp.einsum('btkgd,bskd->bkgts', q_BTKGD, k_BSKD,
                       preferred_element_type=jnp.float32) * D**-0.5
  mask_BTS = kpos_BS[:, None, :] <= qpos_BT[:, :, None]
  if window:
    mask_BTS &= kpos_BS[:, None, :] > qpos_BT[:, :, None] - window
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, _NEG_INF)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKD.dtype)
  o_BTKGD = jnp.einsum('bkgts,bskd->btkgd', p_BKGTS, v_BSKD)
  return o_BTKGD.reshape(B, T, H, D)
