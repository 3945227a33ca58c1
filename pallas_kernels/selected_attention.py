"""Selected-block attention, the selection branch of Native Sparse Attention (Yuan et al. 2025, Sec. 3.3.2).

Query `t` of kv-head group `h` attends to the keys of the blocks listed in `block_indices[b, t, h]`
(block `j` covers `[j * block_size, (j + 1) * block_size)`) whose position is `<= t`. A `-1` slot is
unused and a repeated block counts once. A query whose list shows it no key (every slot `-1`, or only
blocks starting after `t`) outputs zeros and gets zero gradients.

Kernel design (NSA Sec. 4, "group-centric"): the G query heads of a kv group share the block list, so each
selected K/V block is loaded once for the whole group and the group's heads form the rows (M) of the
matmul with it. For small groups (G = 1..4, where NSA's M = G wastes most of a 16-row tensor-core tile)
a program takes `block_q` consecutive tokens, so M = block_q * G, and loops over the UNION of their block
lists; a row only sees the blocks of its own token (a membership test against its list). Consecutive
tokens share the first and the local blocks and their top-n choices tend to overlap, which keeps the
union below block_q * n (the cost of a larger block_q is the blocks a row loads but does not use). This
is a query-major variant, not FSA's key-major loop inversion (Yan et al. 2025), which this file does not
implement.

Backward: dq is query-major like the forward. dk/dv iterate over key blocks, each over the query tiles
whose union contains it: that inverse map is built with an argsort of the (tile, block) pairs into a CSR
list, never as a dense [tiles, blocks] mask. The forward saves the per-row log-sum-exp for it.

Bodies: the GPU (Triton) body loops over a tile's blocks inside one program and reads K/V by pointer,
`block_k` keys at a time (dk/dv: one program per `block_k` keys of a block), so large blocks (MoBA's 512)
hold no more registers or shared memory than NSA's 64.
The TPU (Mosaic) body puts the union slots on the grid: the block lists are scalar-prefetched and drive
the K/V fetches through the BlockSpec index maps (as splash attention does with its mask metadata);
unused slots repeat the previous block so no new DMA is issued, and their compute is skipped. Whole tables
would hold B * Hkv * (T / block_q) * U int32 (U <= min(block_q * n, T / block_size)), past SMEM's ~1 MiB
from T = 4096 on, so the work is flattened and cut into chunks, one pallas_call per chunk in a loop, the
outputs carried through it and aliased so a call writes only its own blocks. Forward and dq: the
W = B * Hkv * (T / block_q) work items (b, h, query tile), Wc per call on grid (Wc, U); the last call
starts early and recomputes a few items to the same values. dk/dv: the (tile, block) pairs of the whole
problem sorted by (b, h, block), Pc per call, ceil(real pairs / Pc) calls; a key block's pairs are one
run whose sums start from the aliased dk/dv block, so a run that straddles two calls continues from what
the first wrote (rounded once more to dk/dv's dtype there). A call prefetches at most max(E, U + 2) int32,
E = `tpu_table_entries`, whatever B and T. The dk/dv calls take their pairs in order, so on a chip with
two TensorCores per device (v4, v5p) they use one.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
  check_implementation,
  dispatch,
  in_shard_map,
  interpret_param,
  out_struct,
  vary_alike,
)
from pallas_kernels._reference import MASK_VALUE, XLA_CHUNK, map_query_chunks
from pallas_kernels._sparse_common import (
  canonical_lists,
  check_listed_args,
  finish,
  online_step,
  per_group,
  probs_and_dscores,
  visible_lists,
)

_TRANS_B = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static choices of one call: hashable, so it is a `nondiff_argnums` of the custom_vjp."""
  block_size: int
  block_q: int  # query tokens per program; rows per program M = block_q * group
  block_k: int  # keys per step of the GPU bodies, a divisor of block_size (the TPU bodies take whole blocks)
  group: int
  sm_scale: float
  backend: str
  interpret: bool
  num_warps: int
  num_stages: int
  tpu_table_entries: int  # int32 entries one TPU call may scalar-prefetch into SMEM

  @property
  def rows(self) -> int:
    return self.block_q * self.group

  @property
  def sub_tiles(self) -> int:
    return self.block_size // self.block_k


# ----------------------------------------------------------------------------- XLA reference


def selected_attention_reference(q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn, *, block_size: int,
                                 sm_scale: float | None = None, qpos_BT: jax.Array | None = None,
                                 chunk: int | None = XLA_CHUNK) -> jax.Array:
  """The same rule in XLA, gathering each (token, kv group)'s selected K/V rows: memory
  O(chunk * n * block_size) a call, no `[T, S]` mask, `chunk` queries at a time (`map_query_chunks`;
  None: all at once). `qpos_BT` places the queries (default `0..T-1`; decoding asks at the end of a
  cache of S positions)."""
  B, T = q_BTHD.shape[:2]
  if qpos_BT is None:
    qpos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  def one_chunk(q_BQHD, idx_BQKn, pos_BQ):
    return _gathered_attention(q_BQHD, k_BSKD, v_BSKD, idx_BQKn, pos_BQ, block_size, sm_scale)
  if chunk is None:
    return one_chunk(q_BTHD, block_indices_BTKn, qpos_BT)
  # Padded queries sit at position -1 and select nothing, so they see no key.
  return map_query_chunks(one_chunk, (q_BTHD, block_indices_BTKn, qpos_BT), (0, -1, -1), chunk=chunk)


def _gathered_attention(q_BTHD, k_BSKD, v_BSKD, j_BTKn, qpos_BT, L: int, sm_scale):
  B, T, H, D = q_BTHD.shape
  K, n = k_BSKD.shape[2], j_BTKn.shape[-1]
  scale = D**-0.5 if sm_scale is None else sm_scale
  j_BTKn = per_group(j_BTKn, K)  # shared lists: gathered per group, a chunk at a time
  kpos_BTKnL = jnp.maximum(j_BTKn, 0)[..., None] * L + jnp.arange(L)[None, None, None, None]
  kpos_BKX = kpos_BTKnL.transpose(0, 2, 1, 3, 4).reshape(B, K, -1)

  def take(x_BSKD):  # rows of each kv head along S, without laying K/V out head-major first
    rows_BXKD = jnp.take_along_axis(x_BSKD, kpos_BKX.transpose(0, 2, 1)[..., None], axis=1, mode='clip')
    return rows_BXKD.transpose(0, 2, 1, 3)
  k_BKTnLD, v_BKTnLD = take(k_BSKD).reshape(B, K, T, n, L, D), take(v_BSKD).reshape(B, K, T, n, L, D)
  earlier_111nn = jnp.tril(jnp.ones((n, n), bool), -1)[None, None, None]
  repeat_BTKn = jnp.any((j_BTKn[..., :, None] == j_BTKn[..., None, :]) & earlier_111nn, axis=-1)
  visible_BTKnL = (((j_BTKn >= 0) & ~repeat_BTKn)[..., None]
                   & (kpos_BTKnL <= qpos_BT[:, :, None, None, None]))
  q_BKTGD = q_BTHD.reshape(B, T, K, H // K, D).transpose(0, 2, 1, 3, 4)
  s_BKTGnL = jnp.einsum('bktgd,bktnld->bktgnl', q_BKTGD, k_BKTnLD,
                        preferred_element_type=jnp.float32) * scale
  visible_BKT1nL = visible_BTKnL.transpose(0, 2, 1, 3, 4)[:, :, :, None]
  s_BKTGX = jnp.where(visible_BKT1nL, s_BKTGnL, MASK_VALUE).reshape(B, K, T, H // K, n * L)
  # Multiplying by the mask zeroes rows that see nothing (their softmax would be uniform over junk).
  p_BKTGnL = jax.nn.softmax(s_BKTGX, axis=-1).reshape(s_BKTGnL.shape) * visible_BKT1nL
  o_BKTGD = jnp.einsum('bktgnl,bktnld->bktgd', p_BKTGnL.astype(v_BSKD.dtype), v_BKTnLD,
                       preferred_element_type=jnp.float32)
  return o_BKTGD.transpose(0, 2, 1, 3, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


# ----------------------------------------------------------------------------- block-list bookkeeping


def _tile_unions(j_BKTn: jax.Array, block_q: int, num_blocks: int) -> tuple[jax.Array, jax.Array]:
  """The blocks any token of a `block_q`-token tile selected: `[B, K, NT, U]` (-1 padded) and counts."""
  B, K, T, n = j_BKTn.shape
  U = min(block_q * n, num_blocks)
  union_BKNU = canonical_lists(j_BKTn.reshape(B, K, T // block_q, block_q * n))[..., :U]
  return union_BKNU, jnp.sum(union_BKNU >= 0, axis=-1, dtype=jnp.int32)


def _fetch_table(union_BKNU: jax.Array, count_BKN: jax.Array) -> jax.Array:
  """Union lists with each unused slot repeating the last used block (block 0 if none): a valid fetch
  that the TPU pipeline skips because the block index does not change."""
  u_111U = jnp.arange(union_BKNU.shape[-1])[None, None, None]
  last_BKNU = jnp.maximum(jnp.minimum(u_111U, count_BKN[..., None] - 1), 0)
  return jnp.maximum(jnp.take_along_axis(union_BKNU, last_BKNU, axis=-1), 0)


def _inverse_map(union_BKNU: jax.Array, num_blocks: int, plan: _Plan):
  """Key block -> the query tiles whose union holds it, as CSR over (tile, block) pairs sorted by (block,
  tile) (the GPU body's dk/dv loop): the pairs' tiles `[B, K, P]` (unused pairs at the end); for each step
  x of `block_k` keys, the first pair of its block whose tile has a token at or after key x * block_k
  `[B, K, X]` (earlier tiles of the block's run see none of these keys); each block's end `[B, K, NB]`."""
  B, K, NT, U = union_BKNU.shape
  # Flattened (tile, slot) order is tile-major, so a stable sort by block keeps each run's tiles ascending.
  key_BKP = jnp.where(union_BKNU >= 0, union_BKNU, num_blocks).reshape(B, K, NT * U)
  order_BKP = jnp.argsort(key_BKP, axis=-1, stable=True)
  block_BKP = jnp.take_along_axis(key_BKP, order_BKP, axis=-1)
  npairs_BK = jnp.sum(block_BKP < num_blocks, axis=-1, dtype=jnp.int32)
  p_11P = jnp.arange(NT * U)[None, None]
  last_BKP = jnp.maximum(jnp.minimum(p_11P, npairs_BK[..., None] - 1), 0)
  tile_BKP = jnp.take_along_axis(order_BKP // U, last_BKP, axis=-1).astype(jnp.int32)
  pair_key_BKP = jnp.where(p_11P < npairs_BK[..., None], block_BKP * NT + tile_BKP, num_blocks * NT)
  key0_X = jnp.arange(num_blocks * plan.sub_tiles) * plan.block_k  # each step's first key
  first_key_X = key0_X // plan.block_size * NT + key0_X // plan.block_q
  end_key_J = (jnp.arange(num_blocks) + 1) * NT
  starts = jax.vmap(jax.vmap(lambda key_P, at: jnp.searchsorted(key_P, at), (0, None)), (0, None))
  return (tile_BKP, starts(pair_key_BKP, first_key_X).astype(jnp.int32),
          starts(pair_key_BKP, end_key_J).astype(jnp.int32))


def _visible(idx_Mn, qpos_M1, j, L):
  """[M, L]: row r sees key j*L + c when its token listed block j and j*L + c <= its position."""
  return _listed(idx_Mn, j) & _causal(qpos_M1, j * L, L)


def _listed(idx_Mn, j):
  """[M, 1]: the rows whose token listed block j."""
  return jnp.max(jnp.where(idx_Mn == j, 1.0, 0.0), axis=1)[:, None] > 0


def _causal(qpos_M1, first, width):
  """[M, width]: keys first..first+width-1 at or before each row's position."""
  return first + jax.lax.broadcasted_iota(jnp.int32, (qpos_M1.shape[0], width), 1) <= qpos_M1


# ----------------------------------------------------------------------------- GPU (Triton) bodies
#
# The GPU bodies walk a selected block in steps of `block_k` keys, so what a step holds (the [M, block_k]
# scores, dk/dv's [block_k, D] sums, the K/V rows in shared memory) does not grow with block_size: MoBA's
# blocks of 512 taken whole spilled dk/dv's registers at head_dim 64 and asked 282,624 bytes of shared
# memory at 128, past an H100 block's 232,448 (BENCHMARKS.md). The steps of a block that start after
# every query of the tile (its own block's future) are not taken.


def _over_selected(union_ref, count_ref, idx_Mn, qpos_M1, plan, step, init):
  """Fold `step(carry, rows, visible_Mk)` over the tile's union, `block_k` keys at a time."""
  L, bk = plan.block_size, plan.block_k
  last = (pl.program_id(2) + 1) * plan.block_q - 1  # the tile's last token (rows are token-major)

  def block(u, carry):
    j = union_ref[u]
    listed_M1 = _listed(idx_Mn, j)

    def sub_tile(c, carry):
      first = j * L + c * bk
      return step(carry, pl.ds(pl.multiple_of(first, bk), bk), listed_M1 & _causal(qpos_M1, first, bk))
    # Every block of the union starts at or before `last` (the lists hold no block not yet begun).
    return jax.lax.fori_loop(0, jnp.minimum(plan.sub_tiles, jax.lax.div(last - j * L, bk) + 1), sub_tile,
                             carry)
  return jax.lax.fori_loop(0, count_ref[0], block, init)


def _gpu_specs(M, S, D, U):
  """Grid (b, h, tile) BlockSpecs: a tile's rows of a `[B, K, rows, width]` array, a (b, h)'s whole K or V,
  a tile's union list and count, and the tile's positions."""
  def tile(width):
    return pl.BlockSpec((None, None, M, width), lambda b, h, i: (b, h, i, 0))
  whole_kv = pl.BlockSpec((None, None, S, D), lambda b, h, i: (b, h, 0, 0))
  union = pl.BlockSpec((None, None, None, U), lambda b, h, i: (b, h, i, 0))
  count = pl.BlockSpec((None, None, None, 1), lambda b, h, i: (b, h, i, 0))
  return tile, whole_kv, union, count, pl.BlockSpec((M, 1), lambda b, h, i: (i, 0))


def _fwd_gpu_kernel(union_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, o_ref, lse_ref, *,
                    plan):
  M, D = q_ref.shape
  q_MD = q_ref[...]

  def step(carry, rows, visible_Mk):
    return online_step(q_MD, k_ref[rows, :], v_ref[rows, :], visible_Mk, *carry, plan.sm_scale)

  init = (jnp.full((M, 1), MASK_VALUE, jnp.float32), jnp.zeros((M, 1), jnp.float32),
          jnp.zeros((M, D), jnp.float32))
  o_MD, lse_M1 = finish(*_over_selected(union_ref, count_ref, idx_ref[...], qpos_ref[...], plan, step, init))
  o_ref[...] = o_MD.astype(o_ref.dtype)
  lse_ref[...] = lse_M1


def _dq_gpu_kernel(union_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, *, plan):
  q_MD, do_MD, lse_M1, delta_M1 = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(dq_MD, rows, visible_Mk):
    k_kD = k_ref[rows, :]
    _, ds_Mk = probs_and_dscores(q_MD, k_kD, v_ref[rows, :], do_MD, lse_M1, delta_M1, visible_Mk,
                                 plan.sm_scale)
    return dq_MD + jnp.dot(ds_Mk.astype(k_kD.dtype), k_kD, preferred_element_type=jnp.float32)

  dq_MD = _over_selected(union_ref, count_ref, idx_ref[...], qpos_ref[...], plan, step,
                         jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = dq_MD.astype(dq_ref.dtype)


def _dkdv_gpu_kernel(first_ref, end_ref, tile_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, do_ref, lse_ref,
                     delta_ref, dk_ref, dv_ref, *, plan):
  """One program per `block_k` keys of block j, over the query tiles whose union holds j, from the first
  one that reaches these keys (`first_ref`, built in the wrapper) to the end of j's run."""
  x = pl.program_id(2)
  j, M = jax.lax.div(x, plan.sub_tiles), plan.rows
  k_kD, v_kD = k_ref[...], v_ref[...]

  def body(c, carry):
    dk_kD, dv_kD = carry
    rows = pl.ds(pl.multiple_of(tile_ref[c] * M, M), M)
    q_MD, do_MD = q_ref[rows, :], do_ref[rows, :]
    visible_Mk = _listed(idx_ref[rows, :], j) & _causal(qpos_ref[rows, :], x * plan.block_k, plan.block_k)
    p_Mk, ds_Mk = probs_and_dscores(q_MD, k_kD, v_kD, do_MD, lse_ref[rows, :], delta_ref[rows, :],
                                    visible_Mk, plan.sm_scale)
    dv_kD += jax.lax.dot_general(p_Mk.astype(do_MD.dtype), do_MD, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    dk_kD += jax.lax.dot_general(ds_Mk.astype(q_MD.dtype), q_MD, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return dk_kD, dv_kD

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk_kD, dv_kD = jax.lax.fori_loop(first_ref[x], end_ref[j], body, (zeros, zeros))
  dk_ref[...] = dk_kD.astype(dk_ref.dtype)
  dv_ref[...] = dv_kD.astype(dv_ref.dtype)


def _gpu_forward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, union_BKNU, count_BKN):
  B, K, Mt, D = q_BKMD.shape
  M, NT, U = plan.rows, count_BKN.shape[-1], union_BKNU.shape[-1]
  S, n = k_BKSD.shape[2], idx_BKMn.shape[-1]
  tile, whole_kv, union, count, qpos = _gpu_specs(M, S, D, U)
  return pl.pallas_call(
      functools.partial(_fwd_gpu_kernel, plan=plan),
      grid=(B, K, NT),
      in_specs=[union, count, tile(D), whole_kv, whole_kv, tile(n), qpos],
      out_specs=[tile(D), tile(1)],
      out_shape=[out_struct(q_BKMD.shape, q_BKMD.dtype, q_BKMD, k_BKSD, v_BKSD),
                 out_struct((B, K, Mt, 1), jnp.float32, q_BKMD, k_BKSD, v_BKSD)],
      compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
      interpret=interpret_param(plan.interpret, 'gpu'),
      name='selected_attention_fwd',
  )(union_BKNU, count_BKN[..., None], q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1)


def _gpu_backward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, union_BKNU, count_BKN, do_BKMD, lse_BKM1,
                  delta_BKM1):
  B, K, Mt, D = q_BKMD.shape
  M, L, NT, U = plan.rows, plan.block_size, count_BKN.shape[-1], union_BKNU.shape[-1]
  S, n = k_BKSD.shape[2], idx_BKMn.shape[-1]
  NB = S // L
  params = dict(compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
                interpret=interpret_param(plan.interpret, 'gpu'))
  tile, whole_kv, union, count, qpos = _gpu_specs(M, S, D, U)
  dq_BKMD = pl.pallas_call(
      functools.partial(_dq_gpu_kernel, plan=plan),
      grid=(B, K, NT),
      in_specs=[union, count, tile(D), whole_kv, whole_kv, tile(n), qpos, tile(D), tile(1), tile(1)],
      out_specs=tile(D),
      out_shape=out_struct(q_BKMD.shape, q_BKMD.dtype, q_BKMD, k_BKSD, do_BKMD),
      name='selected_attention_dq', **params,
  )(union_BKNU, count_BKN[..., None], q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, do_BKMD, lse_BKM1,
    delta_BKM1)

  tile_BKP, first_BKX, end_BKJ = _inverse_map(union_BKNU, NB, plan)
  def whole(width):
    return pl.BlockSpec((None, None, Mt, width), lambda b, h, x: (b, h, 0, 0))
  kv_step = pl.BlockSpec((None, None, plan.block_k, D), lambda b, h, x: (b, h, x, 0))
  dk_BKSD, dv_BKSD = pl.pallas_call(
      functools.partial(_dkdv_gpu_kernel, plan=plan),
      grid=(B, K, NB * plan.sub_tiles),
      in_specs=[pl.BlockSpec((None, None, NB * plan.sub_tiles), lambda b, h, x: (b, h, 0)),
                pl.BlockSpec((None, None, NB), lambda b, h, x: (b, h, 0)),
                pl.BlockSpec((None, None, NT * U), lambda b, h, x: (b, h, 0)),
                whole(D), kv_step, kv_step, whole(n), pl.BlockSpec((Mt, 1), lambda b, h, x: (0, 0)),
                whole(D), whole(1), whole(1)],
      out_specs=[kv_step, kv_step],
      out_shape=[out_struct(x.shape, x.dtype, q_BKMD, k_BKSD, do_BKMD) for x in (k_BKSD, v_BKSD)],
      name='selected_attention_dkdv', **params,
  )(first_BKX, end_BKJ, tile_BKP, q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, do_BKMD, lse_BKM1, delta_BKM1)
  return dq_BKMD, dk_BKSD, dv_BKSD


# ----------------------------------------------------------------------------- TPU (Mosaic) bodies


def _split(x, K, NT):
  """`x = (b * K + h) * NT + i` -> (b, h, i), with lax.div/rem (x >= 0): Mosaic cannot lower the sign
  tests of Python's floor division."""
  bh = jax.lax.div(x, NT)
  return jax.lax.div(bh, K), jax.lax.rem(bh, K), jax.lax.rem(x, NT)


def _item_specs(M, L, D, K, NT, U):
  """Grid (item of the chunk, slot) BlockSpecs for work items `(b * K + h) * NT + tile`; the prefetched
  refs are the chunk's first item, its fetch table and its counts."""
  def tile(width):
    def index(w, u, start, fetch, count):
      return *_split(start[0] + w, K, NT), 0
    return pl.BlockSpec((None, None, M, width), index)
  def kv_map(w, u, start, fetch, count):
    b, h, _ = _split(start[0] + w, K, NT)
    return b, h, fetch[w * U + u], 0
  def qpos_map(w, u, start, fetch, count):
    return _split(start[0] + w, K, NT)[2], 0
  return tile, pl.BlockSpec((None, None, L, D), kv_map), pl.BlockSpec((M, 1), qpos_map)


def _fwd_tpu_kernel(start_ref, fetch_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, o0_ref, lse0_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, plan):
  del start_ref, o0_ref, lse0_ref  # o0/lse0: the outputs so far, aliased to o/lse
  w, u, U = pl.program_id(0), pl.program_id(1), pl.num_programs(1)

  @pl.when(u == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(u < count_ref[w])
  def _():
    j = fetch_ref[w * U + u]
    visible_ML = _visible(idx_ref[...], qpos_ref[...], j, plan.block_size)
    m_scr[...], l_scr[...], acc_scr[...] = online_step(q_ref[...], k_ref[...], v_ref[...], visible_ML,
                                                        m_scr[...], l_scr[...], acc_scr[...], plan.sm_scale)

  @pl.when(u == U - 1)
  def _():
    o_MD, lse_M1 = finish(m_scr[...], l_scr[...], acc_scr[...])
    o_ref[...] = o_MD.astype(o_ref.dtype)
    lse_ref[...] = lse_M1


def _dq_tpu_kernel(start_ref, fetch_ref, count_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, do_ref, lse_ref,
                   delta_ref, dq0_ref, dq_ref, dq_scr, *, plan):
  del start_ref, dq0_ref  # dq0: dq so far, aliased to dq
  w, u, U = pl.program_id(0), pl.program_id(1), pl.num_programs(1)

  @pl.when(u == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(u < count_ref[w])
  def _():
    j = fetch_ref[w * U + u]
    k_LD = k_ref[...]
    _, ds_ML = probs_and_dscores(q_ref[...], k_LD, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                                  _visible(idx_ref[...], qpos_ref[...], j, plan.block_size), plan.sm_scale)
    dq_scr[...] += jnp.dot(ds_ML.astype(k_LD.dtype), k_LD, preferred_element_type=jnp.float32)

  @pl.when(u == U - 1)
  def _():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _over_items(plan, kernel, union_BKNU, count_BKN, args, outs, in_specs, out_specs, scratch, name):
  """Runs `kernel` on grid (item, slot) over all B * K * NT work items, `Wc` items per call: a call
  prefetches Wc * U fetch entries, Wc counts and its first item, which fits `plan.tpu_table_entries`.
  `outs` are the initial outputs; returns the final ones."""
  W, U = count_BKN.size, union_BKNU.shape[-1]
  outs = vary_alike(*outs, *args)[:len(outs)]  # in shard_map a loop carry must vary like the kernel's outputs
  Wc = min(W, max(1, (plan.tpu_table_entries - 1) // (U + 1)))
  fetch_WU = _fetch_table(union_BKNU, count_BKN).reshape(W, U)
  count_W = count_BKN.reshape(W)
  call = pl.pallas_call(
      functools.partial(kernel, plan=plan),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(Wc, U),
          in_specs=[*in_specs] + [pl.BlockSpec(memory_space=pl.ANY)] * len(outs),
          out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=[out_struct(o.shape, o.dtype, *args) for o in outs],
      input_output_aliases={3 + len(args) + i: i for i in range(len(outs))},
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
      interpret=interpret_param(plan.interpret, 'tpu'), name=name)

  def chunk(c, outs):
    # The last call ends at item W by starting early: the items it shares with the call before are
    # recomputed to the same values, which needs no padded tables.
    start = jnp.minimum(c * Wc, W - Wc)
    return tuple(call(start[None], jax.lax.dynamic_slice_in_dim(fetch_WU, start, Wc).reshape(Wc * U),
                      jax.lax.dynamic_slice_in_dim(count_W, start, Wc), *args, *outs))
  return jax.lax.fori_loop(0, -(-W // Wc), chunk, tuple(outs))


def _tpu_pairs(union_BKNU: jax.Array, num_blocks: int, Pc: int):
  """Key block -> query tiles over the whole flattened problem, for the TPU's chunked dk/dv.

  The (tile, block) pairs sorted by (b * K + h, block), as keys `(b * K + h) * num_blocks + block` and work
  items `(b * K + h) * NT + tile`, `[P]` with P a multiple of Pc: real pairs first, then the last real
  pair repeated (a fetch that stays put). Also the real pair count (with none, no dk/dv call runs).
  """
  B, K, NT, U = union_BKNU.shape
  bh_BK11 = jnp.arange(B * K, dtype=jnp.int32).reshape(B, K, 1, 1)
  key_X = jnp.where(union_BKNU >= 0, bh_BK11 * num_blocks + union_BKNU, B * K * num_blocks).reshape(-1)
  order_X = jnp.argsort(key_X, stable=True).astype(jnp.int32)
  npairs = jnp.sum(union_BKNU >= 0, dtype=jnp.int32)
  last_P = jnp.maximum(jnp.minimum(jnp.arange(-(-key_X.size // Pc) * Pc), npairs - 1), 0)
  pair_P = order_X[last_P]
  return key_X[pair_P], pair_P // U, npairs


def _pair_specs(M, L, D, K, NT, NB):
  """Grid (pair of the chunk,) BlockSpecs: the pair's query tile and its key block, read from the chunk's
  prefetched items and keys."""
  def by_item(width):
    def index(p, scalars, key, item):
      return *_split(item[p], K, NT), 0
    return pl.BlockSpec((None, None, M, width), index)
  def block_map(p, scalars, key, item):
    return *_split(key[p], K, NB), 0
  qpos = pl.BlockSpec((M, 1), lambda p, scalars, key, item: (jax.lax.rem(item[p], NT), 0))
  return by_item, pl.BlockSpec((None, None, L, D), block_map), qpos


def _dkdv_tpu_kernel(scalars_ref, key_ref, item_ref, q_ref, k_ref, v_ref, idx_ref, qpos_ref, do_ref, lse_ref,
                     delta_ref, dk0_ref, dv0_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, plan, num_blocks):
  """One (tile, block) pair per step. A key block's pairs are one run (in one call or across consecutive
  ones); its sums start from the aliased dk/dv block (zeros, or what the call before left when the run
  straddles calls), and the output block is rewritten every step so it is right whenever the run ends."""
  del item_ref
  p = pl.program_id(0)
  key = key_ref[p]

  @pl.when((p == 0) | (key != key_ref[jnp.maximum(p - 1, 0)]))
  def _():
    dk_scr[...] = dk0_ref[...].astype(jnp.float32)
    dv_scr[...] = dv0_ref[...].astype(jnp.float32)

  @pl.when(scalars_ref[0] + p < scalars_ref[1])  # skip the padding pairs (scalars: first pair, real pairs)
  def _():
    q_MD, do_MD = q_ref[...], do_ref[...]
    visible_ML = _visible(idx_ref[...], qpos_ref[...], jax.lax.rem(key, num_blocks), plan.block_size)
    p_ML, ds_ML = probs_and_dscores(q_MD, k_ref[...], v_ref[...], do_MD, lse_ref[...], delta_ref[...],
                                     visible_ML, plan.sm_scale)
    dv_scr[...] += jnp.dot(p_ML.T.astype(do_MD.dtype), do_MD, preferred_element_type=jnp.float32)
    dk_scr[...] += jnp.dot(ds_ML.T.astype(q_MD.dtype), q_MD, preferred_element_type=jnp.float32)

  dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
  dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_forward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, union_BKNU, count_BKN):
  B, K, Mt, D = q_BKMD.shape
  M, L, NT, U, n = plan.rows, plan.block_size, count_BKN.shape[-1], union_BKNU.shape[-1], idx_BKMn.shape[-1]
  tile, kv, qpos = _item_specs(M, L, D, K, NT, U)
  outs = (jnp.zeros(q_BKMD.shape, q_BKMD.dtype), jnp.zeros((B, K, Mt, 1), jnp.float32))
  args = (q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1)
  return _over_items(plan, _fwd_tpu_kernel, union_BKNU, count_BKN, args, outs,
                     [tile(D), kv, kv, tile(n), qpos], [tile(D), tile(1)],
                     [pltpu.VMEM((M, 1), jnp.float32), pltpu.VMEM((M, 1), jnp.float32),
                      pltpu.VMEM((M, D), jnp.float32)], 'selected_attention_fwd')


def _tpu_dkdv(plan, union_BKNU, args):
  """dk/dv over the sorted (tile, block) pairs, `Pc` per call: a call prefetches Pc keys, Pc items and 2
  scalars (its first pair and the real pair count), which fits `plan.tpu_table_entries`."""
  q_BKMD, k_BKSD, v_BKSD, idx_BKMn = args[:4]
  K, D, L, M = q_BKMD.shape[1], q_BKMD.shape[3], plan.block_size, plan.rows
  NT, n, NB = union_BKNU.shape[2], idx_BKMn.shape[-1], k_BKSD.shape[2] // L
  Pc = min(union_BKNU.size, max(1, (plan.tpu_table_entries - 2) // 2))
  key_P, item_P, npairs = _tpu_pairs(union_BKNU, NB, Pc)
  by_item, by_block, qpos = _pair_specs(M, L, D, K, NT, NB)
  call = pl.pallas_call(
      functools.partial(_dkdv_tpu_kernel, plan=plan, num_blocks=NB),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(Pc,),
          in_specs=[by_item(D), by_block, by_block, by_item(n), qpos, by_item(D), by_item(1), by_item(1),
                    by_block, by_block],
          out_specs=[by_block, by_block],
          scratch_shapes=[pltpu.VMEM((L, D), jnp.float32), pltpu.VMEM((L, D), jnp.float32)]),
      out_shape=[out_struct(x.shape, x.dtype, *args) for x in (k_BKSD, v_BKSD)],
      input_output_aliases={11: 0, 12: 1},
      # Sequential: a run's sums live in scratch from one step to the next.
      compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary',)),
      interpret=interpret_param(plan.interpret, 'tpu'), name='selected_attention_dkdv')

  def chunk(c, dkdv):
    start = c * Pc
    return tuple(call(jnp.stack([start, npairs]), jax.lax.dynamic_slice_in_dim(key_P, start, Pc),
                      jax.lax.dynamic_slice_in_dim(item_P, start, Pc), *args, *dkdv))
  # Blocks no query selected are never visited and keep these zeros.
  dkdv = vary_alike(jnp.zeros(k_BKSD.shape, k_BKSD.dtype), jnp.zeros(v_BKSD.shape, v_BKSD.dtype), *args)[:2]
  return jax.lax.fori_loop(0, -(-npairs // Pc), chunk, dkdv)


def _tpu_backward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, union_BKNU, count_BKN, do_BKMD, lse_BKM1,
                  delta_BKM1):
  K, D = q_BKMD.shape[1], q_BKMD.shape[3]
  M, L, NT, U, n = plan.rows, plan.block_size, count_BKN.shape[-1], union_BKNU.shape[-1], idx_BKMn.shape[-1]
  tile, kv, qpos = _item_specs(M, L, D, K, NT, U)
  args = (q_BKMD, k_BKSD, v_BKSD, idx_BKMn, qpos_M1, do_BKMD, lse_BKM1, delta_BKM1)
  (dq_BKMD,) = _over_items(plan, _dq_tpu_kernel, union_BKNU, count_BKN, args, (jnp.zeros_like(q_BKMD),),
                           [tile(D), kv, kv, tile(n), qpos, tile(D), tile(1), tile(1)], [tile(D)],
                           [pltpu.VMEM((M, D), jnp.float32)], 'selected_attention_dq')
  return (dq_BKMD, *_tpu_dkdv(plan, union_BKNU, args))


# ----------------------------------------------------------------------------- custom_vjp


def _forward_call(plan, *args):
  return (_tpu_forward if plan.backend == 'tpu' else _gpu_forward)(plan, *args)


def _padded_len(plan: _Plan, T: int) -> int:
  step = math.lcm(plan.block_size, plan.block_q)
  return -(-T // step) * step


def _to_rows(plan: _Plan, x_BTHx: jax.Array, K: int) -> jax.Array:
  """[B, T, H, ...] per query head -> the kernels' rows [B, K, Tp * G, ...]: the group padded to G (see
  `build`), T to Tp, rows token-major so a tile of block_q tokens is M = block_q * G rows."""
  B, T, H = x_BTHx.shape[:3]
  rest, G = x_BTHx.shape[3:], plan.group
  x = x_BTHx.reshape(B, T, K, H // K, *rest)
  x = jnp.pad(x, ((0, 0), (0, _padded_len(plan, T) - T), (0, 0), (0, G - H // K)) + ((0, 0),) * len(rest))
  return jnp.moveaxis(x, 2, 1).reshape(B, K, -1, *rest)


def _from_rows(plan: _Plan, x_BKMD: jax.Array, T: int, H: int) -> jax.Array:
  B, K, _, D = x_BKMD.shape
  x_BTKGD = x_BKMD.reshape(B, K, -1, plan.group, D).transpose(0, 2, 1, 3, 4)[:, :T, :, :H // K]
  return x_BTKGD.reshape(B, T, H, D)


def _operands(plan: _Plan, q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn):
  """The kernels' operands: q as rows, K/V as [B, K, Tp, D], each row's block list, its position, and the
  tiles' union lists and counts."""
  T, K = q_BTHD.shape[1], k_BSKD.shape[2]
  Tp = _padded_len(plan, T)
  pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
  idx_BKTn = visible_lists(jnp.pad(block_indices_BTKn.astype(jnp.int32), pad, constant_values=-1),
                          plan.block_size)
  union_BKNU, count_BKN = _tile_unions(idx_BKTn, plan.block_q, Tp // plan.block_size)
  if plan.backend == 'gpu':  # Triton loads need power-of-two sizes
    n = idx_BKTn.shape[-1]
    idx_BKTn = jnp.pad(idx_BKTn, ((0, 0),) * 3 + ((0, pl.next_power_of_2(n) - n),), constant_values=-1)
  idx_BKMn = jnp.repeat(idx_BKTn, plan.group, axis=2)
  qpos_M1 = jnp.repeat(jnp.arange(Tp, dtype=jnp.int32), plan.group)[:, None]
  k_BKSD, v_BKSD = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k_BSKD, v_BSKD))
  return _to_rows(plan, q_BTHD, K), k_BKSD, v_BKSD, idx_BKMn, qpos_M1, union_BKNU, count_BKN


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _planned(plan: _Plan, q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn):
  """The kernel path for one plan: pads T, builds the block lists and tile unions, runs the kernels."""
  return _planned_fwd(plan, q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn)[0]


def _planned_fwd(plan, q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn):
  o_BKMD, lse_BKM1 = _forward_call(plan, *_operands(plan, q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn))
  o_BTHD = _from_rows(plan, o_BKMD, *q_BTHD.shape[1:3])
  # The residuals are the caller's arrays, the block lists and lse with the token axis last: the kernels'
  # layouts (rows of a trailing 1 or n, each list repeated G times) pad to 128 lanes on TPU, 8x-128x.
  idx_BKnT = block_indices_BTKn.astype(jnp.int32).transpose(0, 2, 3, 1)
  return o_BTHD, (q_BTHD, k_BSKD, v_BSKD, idx_BKnT, o_BTHD, lse_BKM1[..., 0])


def _planned_bwd(plan, residuals, do_BTHD):
  # The barrier makes the backward rebuild the operands from the residuals instead of XLA keeping the
  # forward's copies alive between the passes.
  q_BTHD, k_BSKD, v_BSKD, idx_BKnT, o_BTHD, lse_BKM = jax.lax.optimization_barrier(residuals)
  T, H, K = q_BTHD.shape[1], q_BTHD.shape[2], k_BSKD.shape[2]
  args = _operands(plan, q_BTHD, k_BSKD, v_BSKD, idx_BKnT.transpose(0, 3, 1, 2))
  delta_BTH1 = jnp.sum(do_BTHD.astype(jnp.float32) * o_BTHD.astype(jnp.float32), axis=-1, keepdims=True)
  backward = _tpu_backward if plan.backend == 'tpu' else _gpu_backward
  dq_BKMD, dk_BKSD, dv_BKSD = backward(plan, *args, _to_rows(plan, do_BTHD.astype(q_BTHD.dtype), K),
                                       lse_BKM[..., None], _to_rows(plan, delta_BTH1, K))
  dk_BSKD, dv_BSKD = (x.transpose(0, 2, 1, 3)[:, :T] for x in (dk_BKSD, dv_BKSD))
  return _from_rows(plan, dq_BKMD, T, H), dk_BSKD, dv_BSKD, None


_planned.defvjp(_planned_fwd, _planned_bwd)


# ----------------------------------------------------------------------------- public function


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _check_compiled_shapes(plan: _Plan, D: int) -> None:
  """Tile rules of the compiled bodies (interpret mode runs any shape)."""
  L, M, bk = plan.block_size, plan.rows, plan.block_k
  if plan.backend == 'gpu' and not (all(map(_pow2, (L, D, M, bk))) and min(L, D, M, bk) >= 16):
    raise ValueError(f'the Triton body needs block_size={L}, block_k={bk}, head_dim={D} and block_q * '
                     f'group={M} (the group padded to a power of two) to be powers of two >= 16')
  if plan.backend == 'tpu' and (L % 8 or M % 8):
    raise ValueError(f'the TPU body needs block_size={L} and block_q*group={M} to be multiples of 8')


def _default_block_q(backend: str, group: int) -> int:
  """Untuned: the fewest tokens whose heads fill 16 rows (the smallest tensor-core tile on GPU; one packed
  bfloat16 sublane tile on TPU), since every extra token can grow the union of blocks a tile loops over."""
  if backend == 'tpu':
    return 16 // math.gcd(group, 16)
  return max(1, 16 // group)


def selected_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, block_indices_BTKn: jax.Array,
                       *, block_size: int, sm_scale: float | None = None, implementation: str = 'pallas',
                       interpret: bool | None = None, backend: str | None = None, block_q: int | None = None,
                       block_k: int | None = None, num_warps: int = 4, num_stages: int = 2,
                       tpu_table_entries: int = 16384) -> jax.Array:
  """NSA selected-block attention `[B, T, Hq, D]` (see the module docstring for the rule). The block
  lists are `[B, T, Hkv, n]`, or `[B, T, 1, n]` for one list shared by every kv group.

  `block_q`: query tokens per program (default per backend, untuned). `block_k`: keys per step of the GPU
  bodies, a divisor of `block_size` (default `min(block_size, 64)`). `num_warps`/`num_stages`: Triton.
  `tpu_table_entries`: the int32 entries one TPU call may scalar-prefetch; the default, 64 KiB of the ~1 MiB
  SMEM, is untuned (a call then runs ~16K grid steps, which should dwarf its fixed cost).
  A T that is not a multiple of `block_size` (or of `block_q`) is zero-padded: padded keys sit after
  every real query, so causality hides them, and padded queries select nothing.
  """
  check_implementation(implementation)
  check_listed_args('selected_attention', q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn, 'block_indices')
  H, D, K = q_BTHD.shape[2], q_BTHD.shape[3], k_BSKD.shape[2]
  if implementation == 'xla':
    return selected_attention_reference(q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn, block_size=block_size,
                                        sm_scale=sm_scale)
  # The kernels take a list per group: block lists are short (T / block_size blocks at most).
  block_indices_BTKn = per_group(block_indices_BTKn, K)
  def build(body: str, interpreted: bool):
    if interpreted and in_shard_map(q_BTHD, k_BSKD, v_BSKD):  # JAX's interpreter cannot run in shard_map
      return functools.partial(selected_attention_reference, block_size=block_size, sm_scale=sm_scale)
    # Triton tiles are powers of two, so the GPU body pads a group of 3, 5, 6, 12, ... query heads with
    # zero heads: their outputs are dropped, so their cotangents are zero and they add nothing to dk/dv.
    G = pl.next_power_of_2(H // K) if body == 'gpu' else H // K
    bk = (block_k or min(block_size, 64)) if body == 'gpu' else block_size
    if block_size % bk:
      raise ValueError(f'selected_attention needs block_k={bk} to divide block_size={block_size}')
    plan = _Plan(block_size=block_size, block_q=block_q or _default_block_q(body, G), block_k=bk, group=G,
                 sm_scale=D**-0.5 if sm_scale is None else sm_scale, backend=body, interpret=interpreted,
                 num_warps=num_warps, num_stages=num_stages, tpu_table_entries=tpu_table_entries)
    if not interpreted:
      _check_compiled_shapes(plan, D)
    return functools.partial(_planned, plan)
  return dispatch(build, (q_BTHD, k_BSKD, v_BSKD, block_indices_BTKn),
                  jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), backend=backend, interpret=interpret)

