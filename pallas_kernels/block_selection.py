"""Block selection of Native Sparse Attention (Yuan et al. 2025, arXiv:2502.11089, Eqs. 9-11) in memory
linear in the sequence, as Pallas kernels for GPU (Triton) and TPU (Mosaic), beside its XLA reference.

What it computes. Compressed block `i` (key `ck_i`, summarising tokens `[i*d, i*d + l)`, `l = cmp_block`,
`d = cmp_stride`) is visible to query `t` once its last token `i*d + l - 1` is `<= t`. With the caller's
log-sum-exp of the compressed branch (`lse_BHT`, -inf where nothing is visible) the branch's attention
probabilities are recomputed, `p[t, h, i] = exp(q_t . ck_i * sm_scale - lse[h, t])` where visible and exactly
0 elsewhere (Eq. 8), and then
- Eq. 10: the G query heads of a kv group share one selection, so their probabilities add up;
- Eq. 9: stride unit `u` (tokens `[u*d, (u+1)*d)`) gets the compressed blocks covering it, `i = u - m` for
  `m < l/d`, and selection block `j` (tokens `[j*l', (j+1)*l')`, `l' = sel_block`) the sum of its `l'/d`
  units. This is the paper's weighting written in this project's indexing, as in `sparse_lm.attention.nsa`;
- Eq. 11: token `t` keeps the top `n = min(num_selected, S)` of the `S = ceil(T / l')` blocks among those
  starting at or before `t`, the first block and the two local ones (`t // l'` and the one before) always
  kept (Sec. 4.1); the reference applies the rule through `block_choice.select_blocks`, the kernels
  inline. Output `idx_BTKn` int32 in `jax.lax.top_k`'s order: forced blocks first, then by
  descending score, ties to the lower index; slots past the token's valid blocks are -1.
The indices carry no gradient (as in the paper): the inputs are `stop_gradient`ed.

Documents. With `segment_ids` (a packed row), query `t` of the segment starting at `a` sees only the
compressed blocks that begin at or after `a` (and end by `t`), may choose only the selection blocks from
`ceil(a / l')` on, and its forced "first block" is block `ceil(a / l')`: a document that starts on the
selection grid (the packer aligns it, `sparse_lm.data`) gets exactly the blocks it gets alone, shifted by
`a / l'`, and none of another document. The kernels start each query block's tile loop at the tile
holding its first query's first choosable block, so earlier documents cost nothing.

Kernel. A program takes a query block of Q tokens and loops over tiles of St selection blocks, visiting
only the tiles up to the last block that the block's last query can select. A tile's Ct = St*U compressed
blocks (`U = l'/d`) give `p[Q, Ct]`, summed over the G heads (one scores matmul per head). Eq. 9 is two
small matmuls with weight matrices counting the covers, built from iotas: `scores = p @ W_main + carry`,
and the next tile's `carry = p @ W_spill` (compressed blocks at a tile's end cover units of the next
tile). Eq. 11 merges the tile into a running top-n held in registers (GPU) or VMEM scratch (TPU): n rounds
of (the maximum, the lowest block index among the maxima, knock it out), with +inf for forced blocks, -1e30
for blocks starting after the token and -inf for empty or taken slots, so ties and -1 slots come out as
`top_k` gives them. Indices ride in float32 inside the kernels (exact below 2**24 blocks). The Eq. 9 and
float32 score matmuls run at full float32 precision (Triton's default is TF32, Mosaic's bfloat16).
- GPU (Triton): grid (query block, batch, kv head) over the [B, T, H, D] layout; the group's q block is
  `(Q, G, D)` (G padded to a power of two with zero heads, which are never read) and the compressed keys
  of (batch, kv head) stay in HBM, read one tile per loop step.
- TPU (Mosaic): grid (batch, query block, tile), the tile axis last and shrunk to each query block's span
  (later steps are skipped and re-use the last block, as in `flash_attention`). The q block is `(Q, H, D)`
  of the [B, T, H, D] layout, all heads: Mosaic reads one head out of it with a static strided load (a
  dynamic head index does not lower), so a program loops over every kv head statically and q needs no
  transpose. Tiles are key-major, `ck @ q^T` -> `[Ct, Q]`, so everything per query is a lane-dense `[., Q]`
  row: lse is read as `(H, Q)` blocks and the indices written as `[B, K, N, T]`.

Memory. Only `idx_BTKn` is written (padded to Q tokens and n to the body's tile, then sliced); per program
O(Q * (Ct + n)) registers or VMEM, whatever T is. The wrappers copy ck (zero-padded to whole tiles, and
transposed to [B, K, C, D] for TPU), 1 / (16 G) of q's size at d = 16, and q only when it must be padded:
to whole query blocks when Q does not divide T, and on GPU to a power-of-two group. The reference holds
one chunk's `[chunk, C]` at a time. The merge does n rounds of max/min over N + St candidates per tile,
O(T * S * n) comparisons in all; at n = 16 that is likely more time than the score matmuls (an estimate:
nothing here was timed, no accelerator was at hand).

Shape letters: B batch, T queries, H query heads, K kv heads, G = H // K, D head dim, C compressed blocks,
S selection blocks, n selected per token; inside kernels Q query block, Ct / St a tile's compressed and
selection blocks, N the padded top-n width.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_implementation, dispatch, in_shard_map, interpret_param, out_struct
from pallas_kernels._reference import MASK_VALUE, XLA_CHUNK, map_query_chunks
from pallas_kernels.block_choice import segment_starts, select_blocks
from pallas_kernels.compressed_attention import block_ends

# (block_q, block_s): query tokens and selection blocks per program step. Not tuned for speed (no accelerator
# was at hand); the GPU choice is the largest block_q (the fewest re-reads of ck per query) that compiles
# without register spills. Deviceless compiles for H100 and A100 (ptxas -v) at T=65,536, D=128, bfloat16,
# l/d/l' = 32/16/64, n=16, groups 4 and 16, of block_q 16/32/64/128 x block_s 16/32 x 4/8 warps, 2 stages:
# spill-free on both were (16, 16) and (32, 16) with 4 or 8 warps, (16, 32) and (64, 16) with 8 warps only
# ((64, 16) at 4 warps spills 364 bytes on H100, 776 on A100); block_q 128, and block_s 32 with block_q >= 32,
# spill everywhere. (64, 16) at 8 warps uses at most 201 registers on H100 and 215 on A100. TPU: 256 query
# lanes and 128 selection blocks (512 compressed keys at U = 4) a step keep the grid short while a tile's
# float32 [Ct, Q] probabilities take 512 KiB of VMEM.
DEFAULT_BLOCKS = {'gpu': (64, 16), 'tpu': (256, 128)}
GPU_NUM_WARPS, GPU_NUM_STAGES = 8, 2
_LANES = 128
_INVALID = MASK_VALUE  # a block starting after the token: below every score, above an empty slot
_NO_BLOCK = float(2**30)  # index of an empty slot, above every real block in the min-index reductions


# ----------------------------------------------------------------------------- unchunked helpers


def selection_scores(p_BKTC: jax.Array, num_sel: int, *, cmp_block: int, cmp_stride: int,
                     sel_block: int) -> jax.Array:
  """Eq. 9: `[B, K, T, num_sel]` scores of the selection blocks from compressed-block probabilities.

  Stride unit u (tokens `[u*d, (u+1)*d)`) is covered by compressed blocks `u - m`, `m < l/d`; a selection
  block sums its `l'/d` units. Shifted slices, so memory stays linear in T.
  """
  cover, units_per_block = cmp_block // cmp_stride, sel_block // cmp_stride
  C, U = p_BKTC.shape[-1], num_sel * units_per_block
  padded_BKTX = jnp.pad(p_BKTC, ((0, 0), (0, 0), (0, 0), (cover - 1, max(0, U - C))))
  units_BKTU = sum(padded_BKTX[..., cover - 1 - m:cover - 1 - m + U] for m in range(cover))
  return units_BKTU.reshape(*units_BKTU.shape[:-1], num_sel, units_per_block).sum(-1)


def _precision(dtype):
  """Full float32 products for float32 operands (the backends' defaults round them: TF32, bfloat16)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------- XLA reference


def block_selection_reference(q_BTHD: jax.Array, ck_BCKD: jax.Array, lse_BHT: jax.Array, *, cmp_block: int,
                              cmp_stride: int, sel_block: int, num_selected: int,
                              sm_scale: float | None = None, pos_BT: jax.Array | None = None,
                              num_blocks: int | None = None, segment_ids: jax.Array | None = None,
                              starts_BT: jax.Array | None = None, chunk: int = XLA_CHUNK) -> jax.Array:
  """`block_selection` in XLA, `chunk` queries at a time: `[chunk, C]` probabilities, never `[T, C]`.

  `pos_BT`: the queries' positions (default `0..T-1`; decoding passes its own), which decide visibility,
  validity and the forced blocks. `num_blocks`: S, the selection blocks of the keys (default
  `ceil(T / sel_block)`; decoding passes the cache's). `segment_ids` as for `block_selection` (queries at
  `0..T-1`). `starts_BT`: instead, the position where each query's segment starts (queries placed by
  `pos_BT`, as a context-parallel share of a row is). Output `[B, T, K, min(num_selected, S)]` int32.
  """
  q_BTHD, ck_BCKD, lse_BHT = map(lax.stop_gradient, (q_BTHD, ck_BCKD, lse_BHT))
  B, T, H, D = q_BTHD.shape
  if pos_BT is None:
    pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  if starts_BT is not None:
    start_BT = starts_BT.astype(jnp.int32)
  else:
    start_BT = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_starts(segment_ids)
  one_chunk = functools.partial(
      _select_chunk, ck_BCKD, cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
      num_selected=num_selected, sm_scale=D**-0.5 if sm_scale is None else sm_scale,
      num_blocks=-(-T // sel_block) if num_blocks is None else num_blocks)
  # Padded queries sit at position -1 with lse -inf: they see no block and select nothing.
  return map_query_chunks(one_chunk, (q_BTHD, lse_BHT.astype(jnp.float32).transpose(0, 2, 1), pos_BT,
                                      start_BT), (0, -jnp.inf, -1, 0), chunk=chunk)


def _select_chunk(ck_BCKD, q_BTHD, lse_BTH, pos_BT, start_BT, *, cmp_block, cmp_stride, sel_block,
                  num_selected, sm_scale, num_blocks):
  B, T, H, D = q_BTHD.shape
  C, K = ck_BCKD.shape[1:3]
  end_C = block_ends(C, cmp_block=cmp_block, cmp_stride=cmp_stride)
  s_BKGTC = jnp.einsum('btkgd,bckd->bkgtc', q_BTHD.reshape(B, T, K, H // K, D), ck_BCKD,
                       preferred_element_type=jnp.float32, precision=_precision(q_BTHD.dtype)) * sm_scale
  lse_BKGT1 = lse_BTH.transpose(0, 2, 1).reshape(B, K, H // K, T)[..., None]
  inside_BTC = ((end_C[None, None, :] <= pos_BT[:, :, None])
                & (jnp.arange(C)[None, None, :] * cmp_stride >= start_BT[:, :, None]))
  visible_BKGTC = inside_BTC[:, None, None] & (lse_BKGT1 > -jnp.inf)
  p_BKGTC = jnp.where(visible_BKGTC, jnp.exp(s_BKGTC - lse_BKGT1), 0.0)
  # NSA Eq. 10: the heads of a group share one selection, so their probabilities add up.
  score_BKTS = selection_scores(p_BKGTC.sum(axis=2), num_blocks, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                sel_block=sel_block)
  # Eq. 11 with the first and the two local blocks forced (Sec. 4.1).
  return select_blocks(score_BKTS.transpose(0, 2, 1, 3), pos_BT, num_selected=num_selected,
                       block_size=sel_block, force_first=True, force_local=2,
                       first_BT=-(-start_BT // sel_block))


# ----------------------------------------------------------------------------- public function


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static choices of one call."""
  cmp_block: int
  cmp_stride: int
  sel_block: int
  num_out: int  # n = min(num_selected, S)
  sm_scale: float
  q_len: int
  num_blocks: int  # S
  group: int
  block_q: int
  block_s: int
  backend: str
  interpret: bool
  num_warps: int
  num_stages: int

  @property
  def cover(self) -> int:
    return self.cmp_block // self.cmp_stride

  @property
  def units(self) -> int:
    return self.sel_block // self.cmp_stride

  @property
  def block_c(self) -> int:
    return self.block_s * self.units

  @property
  def num_tiles(self) -> int:
    return pl.cdiv(self.num_blocks, self.block_s)

  @property
  def padded_len(self) -> int:
    return pl.cdiv(self.q_len, self.block_q) * self.block_q

  @property
  def width(self) -> int:
    """N, the top-n width inside the kernel: a power of two (Triton) or whole sublane tiles (TPU)."""
    return pl.next_power_of_2(self.num_out) if self.backend == 'gpu' else 8 * pl.cdiv(self.num_out, 8)


def block_selection(q_BTHD: jax.Array, ck_BCKD: jax.Array, lse_BHT: jax.Array, *, cmp_block: int,
                    cmp_stride: int, sel_block: int, num_selected: int, sm_scale: float | None = None,
                    block_q: int | None = None, implementation: str = 'pallas', backend: str | None = None,
                    interpret: bool | None = None, block_s: int | None = None,
                    num_warps: int = GPU_NUM_WARPS, num_stages: int = GPU_NUM_STAGES,
                    segment_ids: jax.Array | None = None) -> jax.Array:
  """NSA's selected blocks `[B, T, K, min(num_selected, S)]` int32 (see the module docstring for the rule).

  q `[B, T, H, D]` at positions `0..T-1`; ck `[B, C, K, D]` the compressed keys as the compressed branch
  scores them (rotated); lse `[B, H, T]` that branch's float32 log-sum-exp (-inf where no block is visible).
  `block_q` / `block_s`: query tokens and selection blocks per program step (defaults `DEFAULT_BLOCKS`,
  clipped to the sequence); compiled, the Triton body takes powers of two >= 16 and `sel_block /
  cmp_stride` a power of two, the TPU body a `block_q` multiple of 128 and a `block_s` multiple of 8.
  `num_warps` / `num_stages`: the Triton body's. `segment_ids` `[B, T]` (a packed row, each segment one
  run): see "Documents" in the module docstring.
  """
  check_implementation(implementation)
  _check_args(q_BTHD, ck_BCKD, lse_BHT, cmp_block, cmp_stride, sel_block, num_selected)
  q_BTHD, ck_BCKD, lse_BHT = map(lax.stop_gradient, (q_BTHD, ck_BCKD, lse_BHT.astype(jnp.float32)))
  B, T, H, D = q_BTHD.shape
  K, S = ck_BCKD.shape[2], -(-T // sel_block)
  rule = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block, num_selected=num_selected,
              sm_scale=sm_scale)
  if implementation == 'xla':
    return block_selection_reference(q_BTHD, ck_BCKD, lse_BHT, segment_ids=segment_ids, **rule)
  start_BT = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_starts(segment_ids)

  def build(body: str, interpreted: bool):
    if interpreted and in_shard_map(q_BTHD, ck_BCKD, lse_BHT):  # JAX's interpreter cannot run in shard_map
      # The starts are one run per segment too, so they serve as the reference's segment ids.
      return lambda q, ck, lse, start: block_selection_reference(q, ck, lse, segment_ids=start, **rule)
    default_q, default_s = DEFAULT_BLOCKS[body]
    plan = _Plan(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block,
                 num_out=min(num_selected, S), sm_scale=float(D**-0.5 if sm_scale is None else sm_scale),
                 q_len=T, num_blocks=S, group=H // K,
                 block_q=_clip(block_q or default_q, T, body, _LANES),
                 block_s=_clip(block_s or default_s, S, body, 8),
                 backend=body, interpret=interpreted, num_warps=num_warps, num_stages=num_stages)
    _check_plan(plan, D)
    return functools.partial(_BODIES[body], plan)
  return dispatch(build, (q_BTHD, ck_BCKD, lse_BHT, start_BT),
                  jax.ShapeDtypeStruct((B, T, K, min(num_selected, S)), jnp.int32), backend=backend,
                  interpret=interpret)


def computed_tiles(seq_len: int, *, block_q: int, block_s: int, sel_block: int,
                   segment_ids=None) -> int:
  """The (query block, tile of `block_s` selection blocks) steps the kernels compute for one kv group of
  each row, summed over the rows, from their own loop bounds: each tile is `G * block_q * block_s *
  sel_block / cmp_stride` score products plus its Eq. 9 and top-n merge."""
  B = 1 if segment_ids is None else segment_ids.shape[0]
  plan = _Plan(cmp_block=sel_block, cmp_stride=sel_block, sel_block=sel_block, num_out=1, sm_scale=1.0,
               q_len=seq_len, num_blocks=-(-seq_len // sel_block), group=1, block_q=block_q,
               block_s=block_s, backend='gpu', interpret=True, num_warps=1, num_stages=1)
  starts = (np.zeros((B, seq_len), np.int32) if segment_ids is None
            else np.asarray(segment_starts(jnp.asarray(segment_ids))))
  total = 0
  for b in range(B):
    for i in range(-(-seq_len // block_q)):
      first = int(_first_tile(-(-int(starts[b, i * block_q]) // sel_block), plan))
      total += max(int(_last_tile(i, plan)) - first + 1, 0)
  return total


def _check_args(q, ck, lse, cmp_block, cmp_stride, sel_block, num_selected) -> None:
  if q.ndim != 4 or ck.ndim != 4 or q.shape[0] != ck.shape[0] or q.shape[3] != ck.shape[3]:
    raise ValueError(f'want q [B, T, H, D] and ck [B, C, K, D]; got {q.shape}, {ck.shape}')
  B, T, H, _ = q.shape
  if H % ck.shape[2] or lse.shape != (B, H, T):
    raise ValueError(f'want H % K == 0 and lse [B, H, T]; got q {q.shape}, ck {ck.shape}, lse {lse.shape}')
  if (min(cmp_block, cmp_stride, sel_block, num_selected) < 1 or cmp_block % cmp_stride
      or sel_block % cmp_stride):
    raise ValueError(f'cmp_stride={cmp_stride} must divide cmp_block={cmp_block} and sel_block={sel_block}, '
                     f'and num_selected={num_selected} be positive')


def _clip(block: int, length: int, backend: str, tpu_multiple: int) -> int:
  """No larger than the smallest legal block that covers `length`: bigger only adds padding."""
  cover = (max(16, pl.next_power_of_2(length)) if backend == 'gpu'
           else tpu_multiple * pl.cdiv(length, tpu_multiple))
  return min(block, cover)


def _pow2(x: int) -> bool:
  return x >= 16 and x & (x - 1) == 0


def _check_plan(plan: _Plan, D: int) -> None:
  """What every body needs, and the tile rules of the compiled bodies (interpret mode runs any tile)."""
  if plan.cover - 1 > plan.block_c:
    raise ValueError(f'block_s={plan.block_s}: a tile of {plan.block_c} compressed blocks is shorter than '
                     f'cmp_block / cmp_stride - 1 = {plan.cover - 1}, the units one spills into the next')
  if plan.num_blocks >= 2**24:
    raise ValueError(f'{plan.num_blocks} selection blocks: the kernels carry indices in float32 (< 2**24)')
  if plan.interpret:
    return
  if plan.backend == 'gpu' and not (_pow2(plan.block_q) and _pow2(plan.block_s) and _pow2(D)
                                    and plan.units & (plan.units - 1) == 0):
    raise ValueError(f'the Triton body needs block_q={plan.block_q}, block_s={plan.block_s} and head_dim={D} '
                     f'to be powers of two >= 16 and sel_block / cmp_stride = {plan.units} a power of two')
  if plan.backend == 'tpu' and (plan.block_q % _LANES or plan.block_s % 8 or plan.block_c % 16):
    raise ValueError(f'the TPU body needs block_q={plan.block_q} a multiple of {_LANES} and block_s='
                     f'{plan.block_s} a multiple of 8 with block_s * sel_block / cmp_stride a multiple of 16')


# ----------------------------------------------------------------------------- shared kernel math


def _last_tile(i, plan: _Plan):
  """The last tile query block `i` visits: the one holding its last query's current selection block."""
  last_query = jnp.minimum(plan.q_len - 1, (i + 1) * plan.block_q - 1)
  return lax.div(lax.div(last_query, plan.sel_block), plan.block_s)  # lax.div: Mosaic lowers no `//` here


def _first_tile(first, plan: _Plan):
  """The first tile a query block visits: the one holding its first query's first choosable block."""
  return lax.div(first, plan.block_s)


def _probs(s, lse, c, t, start, plan: _Plan):
  """Eq. 8 recomputed: exp(s - lse) where compressed block `c` is visible to query `t` (ended, and begun
  at or after the start of the query's segment), else exactly 0."""
  first_token = c * plan.cmp_stride
  visible = (first_token + plan.cmp_block - 1 <= t) & (first_token >= start) & (lse > -jnp.inf)
  return jnp.where(visible, jnp.exp(s - lse), 0.0)


def _eq9_weights(plan: _Plan, key_axis: int):
  """Eq. 9 as matmuls over a tile: `main[c, j]` counts the m < l/d whose unit `c + m` lies in the tile's
  selection block j, `spill[c, j]` those landing in block j of the next tile (`[Ct, St]`, or `[St, Ct]`
  with key_axis=1)."""
  Ct, U = plan.block_c, plan.units
  shape = (Ct, plan.block_s) if key_axis == 0 else (plan.block_s, Ct)
  c = lax.broadcasted_iota(jnp.int32, shape, key_axis)
  j = lax.broadcasted_iota(jnp.int32, shape, 1 - key_axis)
  main = spill = jnp.zeros(shape, jnp.float32)
  for m in range(plan.cover):
    main += jnp.where((c + m >= j * U) & (c + m < (j + 1) * U), 1.0, 0.0)
    spill += jnp.where((c + m - Ct >= j * U) & (c + m - Ct < (j + 1) * U), 1.0, 0.0)
  return main, spill


def _eq11(score, j, t, first, sel_block: int):
  """Scores as the merge ranks them: forced blocks (the first of the query's segment, the current and the
  one before) +inf, blocks starting after the token or before `first` _INVALID. `j == t // l' or
  t // l' - 1` is `t < (j + 2) l'` among valid j."""
  valid = (j * sel_block <= t) & (j >= first)
  forced = valid & ((j == first) | (t < (j + 2) * sel_block))
  return jnp.where(forced, jnp.inf, jnp.where(valid, score, _INVALID))


def _merge_top(top, top_j, new, new_j, n: int, axis: int):
  """The best n of a running list and a tile's candidates along `axis`, best first: n rounds of the
  maximum, the lowest index among the maxima (ties to the lower block, as top_k), and knocking it out.
  Indices are unique among real blocks, so the knock-out takes exactly the chosen one."""
  slot = lax.broadcasted_iota(jnp.int32, top.shape, axis)

  def pick(r, state):
    top, top_j, new, new_j, out, out_j = state
    best = jnp.maximum(top.max(axis=axis, keepdims=True), new.max(axis=axis, keepdims=True))
    best_j = jnp.minimum(jnp.where(top == best, top_j, _NO_BLOCK).min(axis=axis, keepdims=True),
                         jnp.where(new == best, new_j, _NO_BLOCK).min(axis=axis, keepdims=True))
    out = jnp.where(slot == r, best, out)
    out_j = jnp.where(slot == r, best_j, out_j)
    top = jnp.where(top_j == best_j, -jnp.inf, top)
    return top, top_j, jnp.where(new_j == best_j, -jnp.inf, new), new_j, out, out_j

  empty = (jnp.full(top.shape, -jnp.inf, jnp.float32), jnp.full(top.shape, _NO_BLOCK, jnp.float32))
  return lax.fori_loop(0, n, pick, (top, top_j, new, new_j, *empty))[4:]


def _dot(a, b, contract, precision=None):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32, precision=precision)


def _nt(a, b, precision):
  return _dot(a, b, ((1,), (1,)), precision)


def _nn(a, b):  # the Eq. 9 matmuls: float32 probabilities, at full precision
  return _dot(a, b, ((1,), (0,)), lax.Precision.HIGHEST)


def _indices(top, top_j):
  return jnp.where(top > _INVALID, top_j.astype(jnp.int32), -1)


def _padded(x, axis: int, size: int, fill=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=fill) if size > x.shape[axis] else x


def _compressed_keys(ck_BCKD, plan: _Plan):
  """The compressed keys some query can see (blocks ending before T), zero-padded to whole tiles."""
  visible = max(0, (plan.q_len - plan.cmp_block) // plan.cmp_stride + 1)
  return _padded(ck_BCKD[:, :visible], 1, plan.num_tiles * plan.block_c)


# ----------------------------------------------------------------------------- GPU body (Triton)


def _gpu_kernel(q_ref, ck_ref, lse_ref, start_ref, idx_ref, *, plan: _Plan, precision):
  i = pl.program_id(0)
  Q, St, Ct = plan.block_q, plan.block_s, plan.block_c
  t_Q1 = i * Q + lax.broadcasted_iota(jnp.int32, (Q, 1), 0)
  start_Q1 = start_ref[...][:, None]
  first_Q1 = lax.div(start_Q1 + plan.sel_block - 1, plan.sel_block)
  main_CS, spill_CS = _eq9_weights(plan, key_axis=0)

  def tile(k, carry):
    spill_QS, top_QN, topj_QN = carry
    ck_CD = ck_ref[pl.ds(pl.multiple_of(k * Ct, Ct), Ct), :]
    c_1C = k * Ct + lax.broadcasted_iota(jnp.int32, (1, Ct), 1)

    def head(g, p_QC):  # NSA Eq. 10: the group's probabilities add up
      s_QC = _nt(q_ref[:, g, :], ck_CD, precision) * plan.sm_scale
      return p_QC + _probs(s_QC, lse_ref[g, :][:, None], c_1C, t_Q1, start_Q1, plan)

    p_QC = lax.fori_loop(0, plan.group, head, jnp.zeros((Q, Ct), jnp.float32))
    j_QS = k * St + lax.broadcasted_iota(jnp.int32, (Q, St), 1)
    score_QS = _eq11(_nn(p_QC, main_CS) + spill_QS, j_QS, t_Q1, first_Q1, plan.sel_block)
    top_QN, topj_QN = _merge_top(top_QN, topj_QN, score_QS, j_QS.astype(jnp.float32), plan.num_out, axis=1)
    return _nn(p_QC, spill_CS), top_QN, topj_QN

  N = plan.width
  init = (jnp.zeros((Q, St), jnp.float32), jnp.full((Q, N), -jnp.inf, jnp.float32),
          jnp.full((Q, N), _NO_BLOCK, jnp.float32))
  # Tiles before the first query's segment hold no choosable block (and spill nothing into the first
  # visited tile: their compressed blocks start before every query's segment), so they are skipped.
  lo = _first_tile(jnp.min(first_Q1), plan)
  _, top_QN, topj_QN = lax.fori_loop(lo, _last_tile(i, plan) + 1, tile, init)
  idx_ref[...] = _indices(top_QN, topj_QN)


def _gpu_body(plan: _Plan, q_BTHD, ck_BCKD, lse_BHT, start_BT):
  B, T, H, D = q_BTHD.shape
  K, G, Q = ck_BCKD.shape[2], plan.group, plan.block_q
  Gp, Tp, N = pl.next_power_of_2(G), plan.padded_len, plan.width
  if Gp != G:  # Triton blocks are powers of two: zero heads pad the group (the kernel reads only G)
    q_BTHD = _padded(q_BTHD.reshape(B, T, K, G, D), 3, Gp).reshape(B, T, K * Gp, D)
    lse_BHT = _padded(lse_BHT.reshape(B, K, G, T), 2, Gp, -jnp.inf).reshape(B, K * Gp, T)
  q_BTHD, lse_BHT = _padded(q_BTHD, 1, Tp), _padded(lse_BHT, 2, Tp, -jnp.inf)
  start_BT = _padded(start_BT, 1, Tp, T)
  ck_BCKD = _compressed_keys(ck_BCKD, plan)
  idx_BTKN = pl.pallas_call(
      functools.partial(_gpu_kernel, plan=plan, precision=_precision(q_BTHD.dtype)),
      grid=(Tp // Q, B, K),
      in_specs=[pl.BlockSpec((None, Q, Gp, D), lambda i, b, k: (b, i, k, 0)),
                pl.BlockSpec((None, ck_BCKD.shape[1], None, D), lambda i, b, k: (b, 0, k, 0)),
                pl.BlockSpec((None, Gp, Q), lambda i, b, k: (b, k, i)),
                pl.BlockSpec((None, Q), lambda i, b, k: (b, i))],
      out_specs=pl.BlockSpec((None, Q, None, N), lambda i, b, k: (b, i, k, 0)),
      out_shape=out_struct((B, Tp, K, N), jnp.int32, q_BTHD, ck_BCKD, lse_BHT),
      compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
      interpret=interpret_param(plan.interpret, 'gpu'),
      name='block_selection',
  )(q_BTHD, ck_BCKD, lse_BHT, start_BT)
  return idx_BTKN[:, :T, :, :plan.num_out]


# ----------------------------------------------------------------------------- TPU body (Mosaic)


def _tpu_kernel(first_tile_ref, q_ref, ck_ref, lse_ref, start_ref, idx_ref, top_ref, topj_ref, spill_ref, *,
                plan: _Plan, precision):
  b, i, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  Q, St, Ct, G = plan.block_q, plan.block_s, plan.block_c, plan.group
  tile = first_tile_ref[b * pl.num_programs(1) + i] + step

  @pl.when(step == 0)
  def _init():
    top_ref[...] = jnp.full(top_ref.shape, -jnp.inf, jnp.float32)
    topj_ref[...] = jnp.full(topj_ref.shape, _NO_BLOCK, jnp.float32)
    spill_ref[...] = jnp.zeros(spill_ref.shape, jnp.float32)

  @pl.when(tile <= _last_tile(i, plan))
  def _tile():
    t_1Q = i * Q + lax.broadcasted_iota(jnp.int32, (1, Q), 1)
    start_1Q = start_ref[...]
    first_1Q = lax.div(start_1Q + plan.sel_block - 1, plan.sel_block)
    c_C1 = tile * Ct + lax.broadcasted_iota(jnp.int32, (Ct, 1), 0)
    j_SQ = tile * St + lax.broadcasted_iota(jnp.int32, (St, Q), 0)
    main_SC, spill_SC = _eq9_weights(plan, key_axis=1)
    for k in range(ck_ref.shape[0]):  # static heads: Mosaic reads a head out of [Q, H, D] only statically
      ck_CD = ck_ref[k]
      p_CQ = jnp.zeros((Ct, Q), jnp.float32)
      for h in range(k * G, (k + 1) * G):  # NSA Eq. 10: the group's probabilities add up
        s_CQ = _nt(ck_CD, q_ref[:, h, :], precision) * plan.sm_scale
        p_CQ += _probs(s_CQ, lse_ref[h:h + 1, :], c_C1, t_1Q, start_1Q, plan)
      score_SQ = _eq11(_nn(main_SC, p_CQ) + spill_ref[k], j_SQ, t_1Q, first_1Q, plan.sel_block)
      spill_ref[k] = _nn(spill_SC, p_CQ)
      top_ref[k], topj_ref[k] = _merge_top(top_ref[k], topj_ref[k], score_SQ, j_SQ.astype(jnp.float32),
                                           plan.num_out, axis=0)

  @pl.when(step == pl.num_programs(2) - 1)
  def _write():
    idx_ref[...] = _indices(top_ref[...], topj_ref[...])


def _tpu_body(plan: _Plan, q_BTHD, ck_BCKD, lse_BHT, start_BT):
  B, T, H, D = q_BTHD.shape
  K, Q, St, Ct = ck_BCKD.shape[2], plan.block_q, plan.block_s, plan.block_c
  Tp, N = plan.padded_len, plan.width
  q_BTHD, lse_BHT = _padded(q_BTHD, 1, Tp), _padded(lse_BHT, 2, Tp, -jnp.inf)
  # Per query block, the first tile it visits (scalar-prefetched: the tile axis starts there).
  first_BN = lax.div(start_BT[:, ::Q] + plan.sel_block - 1, plan.sel_block)
  first_tile = _first_tile(first_BN, plan).reshape(-1)
  start_B1T = _padded(start_BT, 1, Tp, T)[:, None, :]
  ck_BKCD = _compressed_keys(ck_BCKD, plan).transpose(0, 2, 1, 3)

  def ck_map(b, i, step, first_tile_ref):  # steps past the block's last tile re-use it: nothing is fetched
    return b, 0, jnp.minimum(first_tile_ref[b * (Tp // Q) + i] + step, _last_tile(i, plan)), 0

  idx_BKNT = pl.pallas_call(
      functools.partial(_tpu_kernel, plan=plan, precision=_precision(q_BTHD.dtype)),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(B, Tp // Q, plan.num_tiles),
          in_specs=[pl.BlockSpec((None, Q, H, D), lambda b, i, step, _: (b, i, 0, 0)),
                    pl.BlockSpec((None, K, Ct, D), ck_map),
                    pl.BlockSpec((None, H, Q), lambda b, i, step, _: (b, 0, i)),
                    pl.BlockSpec((None, 1, Q), lambda b, i, step, _: (b, 0, i))],
          out_specs=pl.BlockSpec((None, K, N, Q), lambda b, i, step, _: (b, 0, 0, i)),
          scratch_shapes=[pltpu.VMEM((K, N, Q), jnp.float32), pltpu.VMEM((K, N, Q), jnp.float32),
                          pltpu.VMEM((K, St, Q), jnp.float32)]),
      out_shape=out_struct((B, K, N, Tp), jnp.int32, q_BTHD, ck_BKCD, lse_BHT),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret_param(plan.interpret, 'tpu'),
      name='block_selection',
  )(first_tile, q_BTHD, ck_BKCD, lse_BHT, start_B1T)
  return idx_BKNT.transpose(0, 3, 1, 2)[:, :T, :, :plan.num_out]


_BODIES = {'gpu': _gpu_body, 'tpu': _tpu_body}
