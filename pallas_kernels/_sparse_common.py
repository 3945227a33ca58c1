"""What the kernels that attend to listed keys share (`selected_attention`: blocks of keys;
`token_attention`: single keys): the canonical form of the lists and the streaming-softmax steps of the
forward and backward bodies."""

import jax
import jax.numpy as jnp

from pallas_kernels._reference import MASK_VALUE

_NONE = jnp.iinfo(jnp.int32).max  # sorts after every real index
_TRANS_B = (((1,), (1,)), ((), ()))


def canonical_lists(j_Xn: jax.Array) -> jax.Array:
  """Each list sorted ascending, repeats dropped, unused slots (-1) moved to the end."""
  key_Xn = jnp.sort(jnp.where(j_Xn < 0, _NONE, j_Xn), axis=-1)
  repeat_Xn = jnp.concatenate([jnp.zeros_like(key_Xn[..., :1], bool), key_Xn[..., 1:] == key_Xn[..., :-1]],
                              axis=-1)
  key_Xn = jnp.sort(jnp.where(repeat_Xn, _NONE, key_Xn), axis=-1)
  return jnp.where(key_Xn == _NONE, -1, key_Xn)


def visible_lists(j_BTKn: jax.Array, block_size: int) -> jax.Array:
  """`[B, K, T, n]` canonical lists without the blocks (of `block_size` keys; 1: single keys) that start
  after the token: they show it nothing."""
  t_1T11 = jnp.arange(j_BTKn.shape[1])[None, :, None, None]
  j_BTKn = jnp.where((j_BTKn >= 0) & (j_BTKn * block_size <= t_1T11), j_BTKn, -1)
  return canonical_lists(j_BTKn.astype(jnp.int32).transpose(0, 2, 1, 3))


def check_listed_args(kernel: str, q_BTHD, k_BSKD, v_BSKD, lists_BTKn, lists: str) -> None:
  """The shapes both kernels take: q `[B, T, Hq, D]`, k/v `[B, T, Hkv, D]`, lists `[B, T, Hkv, n]`, or
  `[B, T, 1, n]`: one list per token shared by every kv group."""
  B, T, H = q_BTHD.shape[:3]
  S, K = k_BSKD.shape[1], k_BSKD.shape[2]
  if (S != T or H % K or v_BSKD.shape != k_BSKD.shape or lists_BTKn.ndim != 4
      or lists_BTKn.shape[:2] != (B, T) or lists_BTKn.shape[2] not in (K, 1)):
    raise ValueError(f'{kernel} needs q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq % Hkv == 0 and '
                     f'{lists} [B, T, Hkv, n] (or [B, T, 1, n], shared by the kv groups); got '
                     f'{q_BTHD.shape}, {k_BSKD.shape}, {v_BSKD.shape}, {lists_BTKn.shape}')


def per_group(lists_BTKn: jax.Array, num_kv_heads: int) -> jax.Array:
  """Shared `[B, T, 1, n]` lists as one per kv group (a broadcast: XLA fuses it into its consumer)."""
  return jnp.broadcast_to(lists_BTKn, (*lists_BTKn.shape[:2], num_kv_heads, lists_BTKn.shape[-1]))


def scores(q_MD, k_LD, scale):
  return jax.lax.dot_general(q_MD, k_LD, _TRANS_B, preferred_element_type=jnp.float32) * scale


def online_step(q_MD, k_LD, v_LD, visible_ML, m_M1, l_M1, acc_MD, scale):
  """One block of the streaming softmax (FlashAttention), with invisible keys contributing exactly 0."""
  s_ML = jnp.where(visible_ML, scores(q_MD, k_LD, scale), MASK_VALUE)
  m_new_M1 = jnp.maximum(m_M1, jnp.max(s_ML, axis=1)[:, None])
  p_ML = jnp.where(visible_ML, jnp.exp(s_ML - m_new_M1), 0.0)
  alpha_M1 = jnp.exp(m_M1 - m_new_M1)
  l_M1 = alpha_M1 * l_M1 + jnp.sum(p_ML, axis=1)[:, None]
  acc_MD = alpha_M1 * acc_MD + jnp.dot(p_ML.astype(v_LD.dtype), v_LD, preferred_element_type=jnp.float32)
  return m_new_M1, l_M1, acc_MD


def finish(m_M1, l_M1, acc_MD):
  """Output and log-sum-exp; a row that saw nothing gets output 0 and lse +inf (so exp(s - lse) = 0)."""
  seen_M1 = l_M1 > 0
  o_MD = jnp.where(seen_M1, acc_MD / jnp.where(seen_M1, l_M1, 1.0), 0.0)
  return o_MD, jnp.where(seen_M1, m_M1 + jnp.log(jnp.where(seen_M1, l_M1, 1.0)), jnp.inf)


def probs_and_dscores(q_MD, k_LD, v_LD, do_MD, lse_M1, delta_M1, visible_ML, scale):
  """Recomputed probabilities and d(scores) (scaled, so dq = ds @ k and dk = ds^T @ q)."""
  p_ML = jnp.where(visible_ML, jnp.exp(scores(q_MD, k_LD, scale) - lse_M1), 0.0)
  dp_ML = jax.lax.dot_general(do_MD, v_LD, _TRANS_B, preferred_element_type=jnp.float32)
  return p_ML, p_ML * (dp_ML - delta_M1) * scale
