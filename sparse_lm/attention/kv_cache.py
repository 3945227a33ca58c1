"""Decoding caches, written once for every variant that decodes: rows written in place, rings for the
keys a window needs, and the choice between a prompt's prefill and a continuation.

A call with a cache runs one of three ways, by the number of new tokens T and where they start:
- T = 1 (a decoding step): written in place, then read back only where the variant's rule reads;
- a prompt into an empty cache (`start == 0`): the whole-sequence path of training (the Pallas kernels on
  a GPU or TPU, their interpreted or XLA forms on a CPU, as `model.kernel` says), then the cache written
  from what it computed: `prefill_or_extend`;
- more tokens after cached ones (a chunked prompt): the cached path for T tokens.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# A key position after every query: unwritten ring slots sit there, so a causal mask hides them.
NEVER = 2**30


def prefill_or_extend(start: jax.Array, T: int, prefill: Callable, extend: Callable, *operands):
  """`extend(*operands)` for one new token; for several, `prefill(*operands)` when the cache is empty
  (`start == 0`, decided at run time), else `extend`."""
  if T == 1:
    return extend(*operands)
  return jax.lax.cond(start == 0, prefill, extend, *operands)


def write_rows(buf_BSX: jax.Array, new_BTX: jax.Array, start: jax.Array) -> jax.Array:
  """Rows `start .. start + T - 1` of a full-length cache, in place."""
  return jax.lax.dynamic_update_slice_in_dim(buf_BSX, new_BTX.astype(buf_BSX.dtype), start, 1)


def ring_write(ring_BWX: jax.Array, new_BTX: jax.Array, pos_BT: jax.Array) -> jax.Array:
  """The new rows into a ring of W slots, position p at slot p mod W (only the last W new rows stay)."""
  W, T = ring_BWX.shape[1], new_BTX.shape[1]
  new_BTX = new_BTX.astype(ring_BWX.dtype)
  if T == 1:
    return jax.lax.dynamic_update_slice_in_dim(ring_BWX, new_BTX, pos_BT[0, 0] % W, 1)
  if T > W:
    new_BTX, pos_BT = new_BTX[:, -W:], pos_BT[:, -W:]
  return ring_BWX.at[:, pos_BT[0] % W].set(new_BTX)


def ring_positions(W: int, last: jax.Array) -> jax.Array:
  """`[W]`: the position each slot holds once `last` is the newest written; `NEVER` where none yet."""
  slot_W = jnp.arange(W)
  pos_W = last - (last - slot_W) % W
  return jnp.where(pos_W >= 0, pos_W, NEVER)


def window_attend(q_BTHD, ring_k_BWKD, ring_v_BWKD, k_BTKD, v_BTKD, pos_BT, window: int):
  """New tokens at `pos_BT` through a window of `window` <= W (the ring's size) over the ring's rows
  and their own, then the rings with the new rows written (after the reads, `after`)."""
  W = ring_k_BWKD.shape[1]
  kpos_11W = ring_positions(W, pos_BT[0, 0] - 1)[None, None, :]  # as the ring was before these tokens
  qpos_BT1 = pos_BT[:, :, None]
  keep_BTW = (kpos_11W <= qpos_BT1) & (kpos_11W > qpos_BT1 - window)
  keep_BTT = (pos_BT[:, None, :] <= qpos_BT1) & (pos_BT[:, None, :] > qpos_BT1 - window)
  o_BTHD = attend(q_BTHD, ring_k_BWKD, ring_v_BWKD, keep_BTW, new=(k_BTKD, v_BTKD, keep_BTT))
  return (o_BTHD, ring_write(ring_k_BWKD, after(k_BTKD, o_BTHD), pos_BT),
          ring_write(ring_v_BWKD, after(v_BTKD, o_BTHD), pos_BT))


def after(x: jax.Array, *reads: jax.Array) -> jax.Array:
  """`x`, made to depend on `reads` (it gains exactly zero), so that a cache write of `x` comes after
  them. XLA on the CPU otherwise copies a donated cache that a step both reads and updates in place
  (two copies a buffer, measured at 65,536 positions: 25 ms against 6 ms a layer); a write ordered
  after the reads needs none."""
  flag = sum(jnp.isnan(jnp.sum(r)).astype(x.dtype) for r in reads)
  return x + 0 * flag


def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, keep_BTS: jax.Array, *,
           new: tuple[jax.Array, jax.Array, jax.Array] | None = None, scale: float | None = None,
           probabilities: bool = False):
  """Attention of a few new tokens over cached rows that all heads of a kv group share, where `keep_BTS`
  allows, and over `new = (k_BTKD, v_BTKD, keep_BTT)` rows besides (the new tokens' own, not yet
  written); a query that keeps no row gets zeros. With `probabilities`, also the float32 probabilities
  of the cached rows `[B, S, T, K]` and of the new rows (None without `new`), summed over each group's
  heads (what NSA's block selection scores), rows first as the scores are laid out.

  Laid out for decoding's bandwidth: the rows are read as one `[S, K * D]` matrix against a
  block-diagonal `[K * D, T * H]` of the queries (head h's query in its kv head's D columns), one matrix
  product whose minor dimension is contiguous in the cache, instead of a product batched over kv heads
  that first lays every head's rows out apart (a copy of the whole cache). The zeros cost K times the
  products, which a step bound by reading the cache does not notice."""
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  G = H // K
  scale = D**-0.5 if scale is None else scale
  eye_KK = jnp.eye(K, dtype=q_BTHD.dtype)
  q_BMX = jnp.einsum('btkgd,kj->btkgjd', q_BTHD.reshape(B, T, K, G, D), eye_KK).reshape(B, T * H, K * D)
  parts = [(k_BSKD, v_BSKD, keep_BTS)] + ([] if new is None else [new])

  def scores(k_BSKD, keep_BTS):
    S = k_BSKD.shape[1]
    s_BSM = jnp.einsum('bsx,bmx->bsm', k_BSKD.reshape(B, S, K * D), q_BMX,
                       preferred_element_type=jnp.float32) * scale
    keep_BSM = jnp.broadcast_to(keep_BTS.transpose(0, 2, 1)[:, :, :, None], (B, S, T, H)).reshape(B, S, T * H)
    return jnp.where(keep_BSM, s_BSM, -jnp.inf), keep_BSM
  s_keep = [scores(k, keep) for k, _, keep in parts]
  m_B1M = functools.reduce(jnp.maximum, [jnp.max(s, axis=1, keepdims=True) for s, _ in s_keep])
  m_B1M = jnp.where(m_B1M > -jnp.inf, m_B1M, 0.0)
  p_parts = [jnp.where(keep, jnp.exp(s - m_B1M), 0.0) for s, keep in s_keep]
  l_B1M = sum(jnp.sum(p, axis=1, keepdims=True) for p in p_parts)
  inv_B1M = 1 / jnp.where(l_B1M > 0, l_B1M, 1.0)
  o_BMX = sum(jnp.einsum('bsm,bsx->bmx', p.astype(v.dtype), v.reshape(B, v.shape[1], K * D),
                         preferred_element_type=jnp.float32)
              for p, (_, v, _) in zip(p_parts, parts, strict=True))
  o_BMX = o_BMX * inv_B1M.transpose(0, 2, 1)
  o_BTHD = jnp.einsum('btkgjd,kj->btkgd', o_BMX.reshape(B, T, K, G, K, D), eye_KK.astype(jnp.float32))
  o_BTHD = o_BTHD.reshape(B, T, H, D).astype(q_BTHD.dtype)
  if not probabilities:
    return o_BTHD
  def per_group(p_BSM):
    return (p_BSM * inv_B1M).reshape(B, -1, T, K, G).sum(axis=-1)
  return o_BTHD, per_group(p_parts[0]), None if new is None else per_group(p_parts[1])


def attend_blocks(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, idx_BTKn: jax.Array, *,
                  block_size: int, pos_BT: jax.Array, scale: float | None = None) -> jax.Array:
  """Each kv group's new tokens over the rows of its listed blocks (`-1`: unused; each listed once, as
  a top-k gives them), up to each token's position: each block is one `[L, D]` slice of the cache,
  gathered group-major, for a few tokens (memory `T n L` rows a group; `selected_attention_reference`
  takes longer prompts a chunk at a time)."""
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1:3]
  n, L = idx_BTKn.shape[-1], block_size
  G = H // K
  scale = D**-0.5 if scale is None else scale
  first_BTKn = jnp.clip(jnp.maximum(idx_BTKn, 0) * L, 0, max(S - L, 0))  # a last partial block slides back
  b_BTKn = jnp.broadcast_to(jnp.arange(B)[:, None, None, None], idx_BTKn.shape)
  k_BTKn = jnp.broadcast_to(jnp.arange(K)[None, None, :, None], idx_BTKn.shape)
  rows = min(L, S)

  def blocks(x_BSKD):  # [B, T, K, n * L, D]
    def one(b, k, first):  # one gather of `[L, D]` slices, as vmapped
      return jax.lax.dynamic_slice(x_BSKD, (b, first, k, 0), (1, rows, 1, D))[0, :, 0]
    got_XLD = jax.vmap(one)(b_BTKn.ravel(), k_BTKn.ravel(), first_BTKn.ravel())
    return got_XLD.reshape(B, T, K, n * rows, D)
  kpos_BTKX = (first_BTKn[..., None] + jnp.arange(rows)[None, None, None, None]).reshape(B, T, K, n * rows)
  lo_BTKX = jnp.repeat(jnp.maximum(idx_BTKn, 0) * L, rows, axis=-1)
  keep_BTKX = (jnp.repeat(idx_BTKn >= 0, rows, axis=-1) & (kpos_BTKX >= lo_BTKX)
               & (kpos_BTKX <= pos_BT[:, :, None, None]))
  s_BTKGX = jnp.einsum('btkgd,btkxd->btkgx', q_BTHD.reshape(B, T, K, G, D), blocks(k_BSKD),
                       preferred_element_type=jnp.float32) * scale
  keep_BTK1X = keep_BTKX[:, :, :, None]
  s_BTKGX = jnp.where(keep_BTK1X, s_BTKGX, -jnp.inf)
  m_BTKG1 = jnp.max(s_BTKGX, axis=-1, keepdims=True)
  p_BTKGX = jnp.where(keep_BTK1X, jnp.exp(s_BTKGX - jnp.where(m_BTKG1 > -jnp.inf, m_BTKG1, 0.0)), 0.0)
  l_BTKG1 = jnp.sum(p_BTKGX, axis=-1, keepdims=True)
  p_BTKGX = p_BTKGX / jnp.where(l_BTKG1 > 0, l_BTKG1, 1.0)
  o_BTKGD = jnp.einsum('btkgx,btkxd->btkgd', p_BTKGX.astype(v_BSKD.dtype), blocks(v_BSKD),
                       preferred_element_type=jnp.float32)
  return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype)
