"""The XLA attention paths: masked softmax attention over explicit query and key positions (dense,
decoding from a cache), and sliding-window attention in memory linear in the sequence."""

import jax
import jax.numpy as jnp

from pallas_kernels._common import MASK_VALUE


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
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, MASK_VALUE)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKD.dtype)
  o_BTKGD = jnp.einsum('bkgts,bskd->btkgd', p_BKGTS, v_BSKD)
  return o_BTKGD.reshape(B, T, H, D)


def local_attend(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, *, window: int) -> jax.Array:
  """Causal sliding-window attention in memory linear in T: queries in chunks of `window` tokens see
  only their own chunk and the one before, which holds every key `t - window < s <= t`."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  if window >= T:
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attend(q_BTHD, k_BTKD, v_BTKD, pos_BT, pos_BT, window=window)
  N = -(-T // window)
  pad = ((0, 0), (0, N * window - T), (0, 0), (0, 0))
  q_BNCKGD = jnp.pad(q_BTHD, pad).reshape(B, N, window, K, H // K, D)

  def with_previous_chunk(x_BTKD):
    x_BNCKD = jnp.pad(x_BTKD, pad).reshape(B, N, window, K, D)
    prev_BNCKD = jnp.pad(x_BNCKD, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    return jnp.concatenate([prev_BNCKD, x_BNCKD], axis=2)
  k_BNSKD, v_BNSKD = with_previous_chunk(k_BTKD), with_previous_chunk(v_BTKD)
  s_BNKGCS = jnp.einsum('bnckgd,bnskd->bnkgcs', q_BNCKGD, k_BNSKD,
                        preferred_element_type=jnp.float32) * D**-0.5
  qpos_NC1 = (jnp.arange(N)[:, None] * window + jnp.arange(window)[None, :])[:, :, None]
  kpos_N1S = (jnp.arange(N)[:, None] * window - window + jnp.arange(2 * window)[None, :])[:, None, :]
  mask_NCS = (kpos_N1S <= qpos_NC1) & (kpos_N1S > qpos_NC1 - window) & (kpos_N1S >= 0)
  s_BNKGCS = jnp.where(mask_NCS[None, :, None, None], s_BNKGCS, MASK_VALUE)
  p_BNKGCS = jax.nn.softmax(s_BNKGCS, axis=-1).astype(v_BTKD.dtype)
  o_BNCKGD = jnp.einsum('bnkgcs,bnskd->bnckgd', p_BNKGCS, v_BNSKD)
  return o_BNCKGD.reshape(B, N * window, H, D)[:, :T]
