"""Grouped matmul: the expert matmul of a dropless Mixture-of-Experts layer (MegaBlocks, Gale et al. 2022).

Tokens arrive sorted by expert: rows `[offset_g, offset_g + group_sizes[g])` of `lhs_MK` belong to expert
`g`, whose weights are `rhs_GKN[g]`. The result equals `jax.lax.ragged_dot(lhs, rhs, group_sizes)`,
including its convention that rows after `sum(group_sizes)` give zeros (`sum(group_sizes)` must not
exceed M; as with ragged_dot, a larger sum is undefined).

Both kernel bodies walk "visits": (group, row tile) pairs in row order, built in the wrapper from
`group_sizes`. A row tile that straddles a group boundary is visited once per group it overlaps, each
visit counting only that group's rows (the megablox scheme); empty groups get no visit, so they cost
nothing (the transposed matmul only writes their zero blocks). Shapes are zero-padded to the tiles and
the result is sliced back, so any M, K, N works. Shape letters here are a matrix's, not the attention
legend's (`sparse_lm/__init__.py`): M rows, K the contraction, N columns, G groups (experts).

- GPU (Triton): one program per (row tile, column tile); it loops over the visits of its row tile and,
  inside, over K, with the lhs rows of other groups zeroed, so one register accumulator serves them all.
- TPU (Mosaic): grid (column tile, visit, K tile); the scalar-prefetched visit list drives the lhs, rhs
  and output block index maps; the f32 accumulator lives in VMEM and each visit stores its own group's
  rows into the output block, which stays resident while consecutive visits share the row tile.

The backward pass is two more grouped matmuls: d_lhs = grouped_matmul(d_out, rhs^T per group), and
d_rhs = transposed_grouped_matmul(lhs, d_out), the per-group lhs_g^T @ d_out_g.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (
  check_backend,
  check_implementation,
  dispatch,
  in_shard_map,
  interpret_param,
  out_struct,
  vary_alike,
)

# (block_m, block_k, block_n): chosen by rule of thumb, not measured. On GPU 64-row tiles waste little
# work on tiles that straddle experts, and 64 x 128 f32 accumulators fit in 4 warps' registers. On TPU
# 128-multiples match the MXU; the double-buffered tiles and the f32 accumulator stay well inside the
# default scoped VMEM even for float32 inputs.
GPU_BLOCKS = (64, 64, 128)
TPU_BLOCKS = (256, 512, 512)
_TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Which body runs, how, and the requested block sizes (fitted to each call's shapes)."""
  backend: str
  interpret: bool
  blocks: tuple[int, int, int]

  def tiles(self, m: int, k: int, n: int) -> tuple[int, int, int]:
    return tuple(_fit(b, d, self.backend) for b, d in zip(self.blocks, (m, k, n), strict=True))


def _fit(block: int, dim: int, backend: str) -> int:
  """The tile for one dimension: no larger than `block`, nor than the dimension needs."""
  if backend == 'gpu':
    return min(block, max(16, pl.next_power_of_2(dim)))
  # The largest 128-multiple <= block that divides the 128-aligned dim, so padding stops at alignment.
  aligned = -(-dim // _TPU_LANES) * _TPU_LANES
  return max(t for t in range(_TPU_LANES, min(block, aligned) + 1, _TPU_LANES) if aligned % t == 0)


def _make_plan(backend, interpret, block_m, block_k, block_n) -> _Plan:
  check_backend(backend)
  defaults = TPU_BLOCKS if backend == 'tpu' else GPU_BLOCKS
  blocks = tuple(d if b is None else b for b, d in zip((block_m, block_k, block_n), defaults, strict=True))
  for name, b in zip(('block_m', 'block_k', 'block_n'), blocks, strict=True):
    if backend == 'gpu' and (b < 16 or b & (b - 1)):
      raise ValueError(f'{name}={b}: the GPU body needs a power of two >= 16 (Triton dot tiles)')
    if backend == 'tpu' and (b <= 0 or b % _TPU_LANES):
      raise ValueError(f'{name}={b}: the TPU body needs a positive multiple of {_TPU_LANES}')
  return _Plan(backend, interpret, blocks)


def _check_operands(lhs_MK, other, group_sizes_G, *, transposed: bool) -> None:
  """`other` is rhs [G, K, N] for the grouped matmul, dout [M, N] for the transposed one."""
  name, want, want_ndim = ('dout', '[M, N]', 2) if transposed else ('rhs', '[G, K, N]', 3)
  if lhs_MK.ndim != 2 or other.ndim != want_ndim:
    raise ValueError(f'lhs must be [M, K] and {name} {want}; got {lhs_MK.shape} and {other.shape}')
  shared, what = (0, 'M') if transposed else (1, 'K')
  if other.shape[-2] != lhs_MK.shape[shared]:
    raise ValueError(f'lhs {lhs_MK.shape} and {name} {other.shape} disagree on {what}')
  if group_sizes_G.ndim != 1 or not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
    raise ValueError(f'group_sizes must be a 1-D integer array; got {group_sizes_G.dtype} '
                     f'{group_sizes_G.shape}')
  if not transposed and group_sizes_G.shape[0] != other.shape[0]:
    raise ValueError(f'group_sizes has {group_sizes_G.shape[0]} groups but rhs has {other.shape[0]}')
  if not (jnp.issubdtype(lhs_MK.dtype, jnp.floating) and jnp.issubdtype(other.dtype, jnp.floating)):
    raise ValueError(f'lhs and {name} must be floating point; got {lhs_MK.dtype} and {other.dtype}')


def _out_dtype(a, b, preferred_element_type):
  return jnp.dtype(jnp.result_type(a, b) if preferred_element_type is None else preferred_element_type)


def _pad_to(x, multiples):
  """Zero-pads each axis at its end up to a multiple; zeros add nothing to any product here."""
  widths = [(0, -d % t) for d, t in zip(x.shape, multiples, strict=True)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


# Visit metadata, computed from group_sizes in the wrapper.


class _Visits(NamedTuple):
  offsets: jax.Array  # int32 [groups + 1]: first row of each group, then the end of the last.
  group: jax.Array  # int32 [V]: the group of each visit.
  tile: jax.Array  # int32 [V]: the row tile of each visit.
  count: jax.Array  # int32 [1]: visits that do work; the V - count after them repeat the last one.


def _visits(group_sizes_G, m_pad: int, tm: int, *, tail: bool, empty: bool) -> _Visits:
  """The (group, row tile) pairs that overlap, in row order.

  `tail` appends a pseudo-group for the rows after the last group, so that every row tile is visited
  and those rows can be zeroed; `empty` gives each empty group one visit, at the tile where it would
  start, so that its output can be zeroed.
  """
  sizes = group_sizes_G.astype(jnp.int32)
  if tail:
    sizes = jnp.append(sizes, m_pad - sizes.sum())
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  tiles_m = m_pad // tm
  # An empty group at the very end of the rows would start one tile past the last.
  first_tile = jnp.minimum(starts // tm, tiles_m - 1)
  per_group = jnp.where(sizes > 0, (ends - 1) // tm - first_tile + 1, int(empty))
  # Each group beyond the first adds at most one visit to a tile already counted.
  bound = tiles_m + sizes.shape[0] - 1
  count = per_group.sum()
  v = jnp.minimum(jnp.arange(bound), jnp.maximum(count - 1, 0))
  group = jnp.repeat(jnp.arange(sizes.shape[0], dtype=jnp.int32), per_group, total_repeat_length=bound)[v]
  first_visit = jnp.cumsum(per_group) - per_group
  tile = first_tile[group] + v - first_visit[group]
  offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends])
  return _Visits(offsets, group, tile.astype(jnp.int32), count.reshape(1).astype(jnp.int32))


# GPU (Triton) bodies.


def _gmm_gpu(lhs_MK, rhs, group_sizes_G, tiles, *, transpose_rhs, out_dtype, interpret):
  tm, tk, tn = tiles
  m_pad, k_pad = lhs_MK.shape
  n_pad = rhs.shape[1 if transpose_rhs else 2]
  tiles_m, tiles_k = m_pad // tm, k_pad // tk
  visits = _visits(group_sizes_G, m_pad, tm, tail=False, empty=False)
  # Visits come in row-tile order, so tile t owns the visits [tile_start[t], tile_start[t + 1]).
  busy_V = jnp.arange(visits.group.shape[0]) < visits.count[0]
  per_tile = jnp.zeros(tiles_m, jnp.int32).at[visits.tile].add(busy_V.astype(jnp.int32))
  tile_start = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(per_tile)])
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def kernel(offsets_ref, group_ref, tile_start_ref, lhs_ref, rhs_ref, out_ref):
    t, n = pl.program_id(0), pl.program_id(1)
    rows_m = t * tm + jnp.arange(tm)

    def visit(v, acc_mn):
      g = group_ref[v]
      mine_m = (rows_m >= offsets_ref[g]) & (rows_m < offsets_ref[g + 1])

      def k_step(kb, acc_mn):
        lhs_mk = jnp.where(mine_m[:, None], lhs_ref[pl.ds(t * tm, tm), pl.ds(kb * tk, tk)], 0)
        if transpose_rhs:
          rhs_blk = rhs_ref[g, pl.ds(n * tn, tn), pl.ds(kb * tk, tk)]
        else:
          rhs_blk = rhs_ref[g, pl.ds(kb * tk, tk), pl.ds(n * tn, tn)]
        return acc_mn + lax.dot_general(lhs_mk, rhs_blk, contract, preferred_element_type=jnp.float32)

      return lax.fori_loop(0, tiles_k, k_step, acc_mn)

    acc_mn = lax.fori_loop(tile_start_ref[t], tile_start_ref[t + 1], visit, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc_mn.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((m_pad, n_pad), out_dtype, lhs_MK, rhs, group_sizes_G),
      grid=(tiles_m, n_pad // tn),
      out_specs=pl.BlockSpec((tm, tn), lambda t, n: (t, n)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name='grouped_matmul',
  )(visits.offsets, visits.group, tile_start, lhs_MK, rhs)


def _tgmm_gpu(lhs_MK, dout_MN, group_sizes_G, tiles, *, out_dtype, interpret):
  tm, tk, tn = tiles
  k_pad, n_pad = lhs_MK.shape[1], dout_MN.shape[1]
  n_groups = group_sizes_G.shape[0]
  offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(group_sizes_G.astype(jnp.int32))])

  def kernel(offsets_ref, lhs_ref, dout_ref, out_ref):
    g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = offsets_ref[g], offsets_ref[g + 1]

    def m_step(t, acc_kn):
      rows_m = t * tm + jnp.arange(tm)
      mine_m1 = ((rows_m >= start) & (rows_m < end))[:, None]
      # Both operands are masked, so a non-finite value in another group's row cannot leak in.
      lhs_mk = jnp.where(mine_m1, lhs_ref[pl.ds(t * tm, tm), pl.ds(k * tk, tk)], 0)
      dout_mn = jnp.where(mine_m1, dout_ref[pl.ds(t * tm, tm), pl.ds(n * tn, tn)], 0)
      return acc_kn + lax.dot_general(lhs_mk, dout_mn, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)

    # An empty group runs no step and writes zeros.
    stop = jnp.where(end > start, (end + tm - 1) // tm, start // tm)
    acc_kn = lax.fori_loop(start // tm, stop, m_step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc_kn.astype(out_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((n_groups, k_pad, n_pad), out_dtype, lhs_MK, dout_MN, group_sizes_G),
      grid=(n_groups, k_pad // tk, n_pad // tn),
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, k, n: (g, k, n)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name='transposed_grouped_matmul',
  )(offsets, lhs_MK, dout_MN)


# TPU (Mosaic) bodies.


def _gmm_tpu(lhs_MK, rhs, group_sizes_G, tiles, *, transpose_rhs, out_dtype, interpret):
  tm, tk, tn = tiles
  m_pad, k_pad = lhs_MK.shape
  n_groups, n_pad = rhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
  tiles_k = k_pad // tk
  visits = _visits(group_sizes_G, m_pad, tm, tail=True, empty=False)
  contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

  def busy(v, group_ref, count_ref):
    """Whether visit v multiplies: the tail pseudo-group only zeroes its rows, padding visits do nothing."""
    return (v < count_ref[0]) & (group_ref[v] < n_groups)

  def kernel(offsets_ref, group_ref, tile_ref, count_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
    v, k = pl.program_id(1), pl.program_id(2)
    g = group_ref[v]

    @pl.when(k == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(busy(v, group_ref, count_ref))
    def _():
      acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], contract,
                                      preferred_element_type=jnp.float32)

    @pl.when((k == tiles_k - 1) & (v < count_ref[0]))
    def _():
      rows_mn = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
      mine_mn = (rows_mn >= offsets_ref[g]) & (rows_mn < offsets_ref[g + 1])
      kept_mn = out_ref[...].astype(jnp.float32)
      out_ref[...] = jnp.where(mine_mn, acc_ref[...], kept_mn).astype(out_ref.dtype)

  # An idle visit pins the last K block, which the step before it used, so it does not sweep K.
  def lhs_map(n, v, k, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], jnp.where(busy(v, group_ref, count_ref), k, tiles_k - 1)

  def rhs_map(n, v, k, offsets_ref, group_ref, tile_ref, count_ref):
    g = jnp.minimum(group_ref[v], n_groups - 1)
    kk = jnp.where(busy(v, group_ref, count_ref), k, tiles_k - 1)
    return (g, n, kk) if transpose_rhs else (g, kk, n)

  def out_map(n, v, k, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], n

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  return pl.pallas_call(
      kernel,
      out_shape=out_struct((m_pad, n_pad), out_dtype, lhs_MK, rhs, group_sizes_G),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n_pad // tn, visits.group.shape[0], tiles_k),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name='grouped_matmul',
  )(*visits, lhs_MK, rhs)


def _tgmm_tpu(lhs_MK, dout_MN, group_sizes_G, tiles, *, out_dtype, interpret):
  tm, tk, tn = tiles
  (m_pad, k_pad), n_pad = lhs_MK.shape, dout_MN.shape[1]
  n_groups = group_sizes_G.shape[0]
  visits = _visits(group_sizes_G, m_pad, tm, tail=False, empty=True)
  last_v = visits.group.shape[0] - 1

  def kernel(offsets_ref, group_ref, tile_ref, count_ref, lhs_ref, dout_ref, out_ref, acc_ref):
    v = pl.program_id(2)
    g = group_ref[v]
    start, end = offsets_ref[g], offsets_ref[g + 1]
    real = v < count_ref[0]
    opens = (v == 0) | (group_ref[jnp.maximum(v - 1, 0)] != g)
    closes = (v == count_ref[0] - 1) | (group_ref[jnp.minimum(v + 1, last_v)] != g)

    @pl.when(real & opens)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real & (end > start))
    def _():
      # Masked in f32 (older TPUs have no bf16 VPU); both operands, so another group's
      # non-finite rows cannot leak in.
      def own_rows(x_ref):
        rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, x_ref.shape, 0)
        x = x_ref[...].astype(jnp.float32)
        return jnp.where((rows >= start) & (rows < end), x, 0).astype(x_ref.dtype)

      acc_ref[...] += lax.dot(own_rows(lhs_ref).T, own_rows(dout_ref), preferred_element_type=jnp.float32)

    @pl.when(real & closes)
    def _():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  def lhs_map(k, n, v, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], k

  def dout_map(k, n, v, offsets_ref, group_ref, tile_ref, count_ref):
    return tile_ref[v], n

  def out_map(k, n, v, offsets_ref, group_ref, tile_ref, count_ref):
    return group_ref[v], k, n

  return pl.pallas_call(
      kernel,
      out_shape=out_struct((n_groups, k_pad, n_pad), out_dtype, lhs_MK, dout_MN, group_sizes_G),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(k_pad // tk, n_pad // tn, visits.group.shape[0]),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name='transposed_grouped_matmul',
  )(*visits, lhs_MK, dout_MN)


# Wrappers: pad to the tiles, pick the body, slice back.


def _gmm(lhs_MK, rhs, group_sizes_G, plan: _Plan, out_dtype, *, transpose_rhs: bool):
  """lhs_MK @ rhs[g] per group, or @ rhs[g].T when `transpose_rhs` (rhs is then [G, N, K])."""
  (m, k), n = lhs_MK.shape, rhs.shape[1 if transpose_rhs else 2]
  tm, tk, tn = plan.tiles(m, k, n)
  dtype = jnp.result_type(lhs_MK, rhs)
  lhs_MK = _pad_to(lhs_MK.astype(dtype), (tm, tk))
  rhs = _pad_to(rhs.astype(dtype), (1, tn, tk) if transpose_rhs else (1, tk, tn))
  body = _gmm_tpu if plan.backend == 'tpu' else _gmm_gpu
  out_MN = body(lhs_MK, rhs, group_sizes_G, (tm, tk, tn), transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                interpret=interpret_param(plan.interpret, plan.backend))
  return out_MN[:m, :n]


def _tgmm(lhs_MK, dout_MN, group_sizes_G, plan: _Plan, out_dtype):
  (m, k), n = lhs_MK.shape, dout_MN.shape[1]
  tm, tk, tn = plan.tiles(m, k, n)
  dtype = jnp.result_type(lhs_MK, dout_MN)
  lhs_MK = _pad_to(lhs_MK.astype(dtype), (tm, tk))
  dout_MN = _pad_to(dout_MN.astype(dtype), (tm, tn))
  body = _tgmm_tpu if plan.backend == 'tpu' else _tgmm_gpu
  out_GKN = body(lhs_MK, dout_MN, group_sizes_G, (tm, tk, tn), out_dtype=out_dtype,
                 interpret=interpret_param(plan.interpret, plan.backend))
  return out_GKN[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, plan: _Plan, out_dtype):
  return _gmm(lhs_MK, rhs_GKN, group_sizes_G, plan, out_dtype, transpose_rhs=False)


def _grouped_matmul_fwd(lhs_MK, rhs_GKN, group_sizes_G, plan, out_dtype):
  out_MN = _gmm(lhs_MK, rhs_GKN, group_sizes_G, plan, out_dtype, transpose_rhs=False)
  return out_MN, (lhs_MK, rhs_GKN, group_sizes_G)


def _grouped_matmul_bwd(plan, out_dtype, residuals, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = residuals
  dlhs_MK = _gmm(dout_MN, rhs_GKN, group_sizes_G, plan, lhs_MK.dtype, transpose_rhs=True)
  drhs_GKN = _tgmm(lhs_MK, dout_MN, group_sizes_G, plan, rhs_GKN.dtype)
  return dlhs_MK, drhs_GKN, None  # group_sizes is integer: no cotangent.


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


# Public functions and their XLA references.


def grouped_matmul_reference(lhs_MK, rhs_GKN, group_sizes_G, *, preferred_element_type=None):
  """XLA's own grouped matmul; plain autodiff gives its gradients."""
  return lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=preferred_element_type)


def transposed_grouped_matmul_reference(lhs_MK, dout_MN, group_sizes_G, *, preferred_element_type=None):
  """XLA's ragged dot with the ragged dimension contracted: [G, K, N], zeros for empty groups."""
  dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                       lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return lax.ragged_dot_general(lhs_MK, dout_MN, group_sizes_G, dims,
                                preferred_element_type=preferred_element_type)


def grouped_matmul(lhs_MK, rhs_GKN, group_sizes_G, *, block_m=None, block_k=None, block_n=None,
                   preferred_element_type=None, implementation='pallas', interpret=None, backend=None):
  """Per group g, rows of group g of `lhs_MK` @ `rhs_GKN[g]`; [M, N], equal to `jax.lax.ragged_dot`.

  Rows are sorted by group and `group_sizes_G` (integer, [G]) counts them; empty groups are allowed and
  rows after `sum(group_sizes_G)` (which must be <= M) give zeros. The output has dtype
  `preferred_element_type` (default: the promoted input dtype); products accumulate in float32.
  Differentiable in `lhs_MK` and `rhs_GKN`. Block sizes default to GPU_BLOCKS / TPU_BLOCKS (untuned)
  and shrink to small shapes; any M, K, N is zero-padded to the tiles.
  """
  check_implementation(implementation)
  group_sizes_G = jnp.asarray(group_sizes_G)
  _check_operands(lhs_MK, rhs_GKN, group_sizes_G, transposed=False)
  out_dtype = _out_dtype(lhs_MK, rhs_GKN, preferred_element_type)
  if implementation == 'xla':
    return grouped_matmul_reference(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=out_dtype)
  def build(body: str, interpreted: bool):
    plan = _make_plan(body, interpreted, block_m, block_k, block_n)
    if interpreted and in_shard_map(lhs_MK, rhs_GKN):  # JAX's interpreter cannot run under shard_map
      return functools.partial(grouped_matmul_reference, preferred_element_type=out_dtype)
    return lambda lhs, rhs, sizes: _grouped_matmul(*vary_alike(lhs, rhs), sizes, plan, out_dtype)
  out = jax.ShapeDtypeStruct((lhs_MK.shape[0], rhs_GKN.shape[2]), out_dtype)
  return dispatch(build, (lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32)), out, backend=backend,
                  interpret=interpret)


def transposed_grouped_matmul(lhs_MK, dout_MN, group_sizes_G, *, block_m=None, block_k=None, block_n=None,
                              preferred_element_type=None, implementation='pallas', interpret=None,
                              backend=None):
  """Per group g, (rows of group g of `lhs_MK`)^T @ (same rows of `dout_MN`); [G, K, N].

  The weight gradient of `grouped_matmul`. Empty groups give zeros; rows after `sum(group_sizes_G)`
  are ignored. The Pallas path is a backward kernel and has no gradient of its own; the 'xla' path
  differentiates by plain autodiff.
  """
  check_implementation(implementation)
  group_sizes_G = jnp.asarray(group_sizes_G)
  _check_operands(lhs_MK, dout_MN, group_sizes_G, transposed=True)
  out_dtype = _out_dtype(lhs_MK, dout_MN, preferred_element_type)
  if implementation == 'xla':
    return transposed_grouped_matmul_reference(lhs_MK, dout_MN, group_sizes_G,
                                               preferred_element_type=out_dtype)
  def build(body: str, interpreted: bool):
    plan = _make_plan(body, interpreted, block_m, block_k, block_n)
    if interpreted and in_shard_map(lhs_MK, dout_MN):  # as in `grouped_matmul`
      return functools.partial(transposed_grouped_matmul_reference, preferred_element_type=out_dtype)
    return lambda lhs, dout, sizes: _tgmm(*vary_alike(lhs, dout), sizes, plan, out_dtype)
  out = jax.ShapeDtypeStruct((group_sizes_G.shape[0], lhs_MK.shape[1], dout_MN.shape[1]), out_dtype)
  return dispatch(build, (lhs_MK, dout_MN, group_sizes_G.astype(jnp.int32)), out, backend=backend,
                  interpret=interpret)
