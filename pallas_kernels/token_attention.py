"""Attention to listed tokens: DeepSeek Sparse Attention's top-k token selection (DeepSeek-AI 2025,
"DeepSeek-V3.2", Sec. 2.1), and any variant that chooses single keys rather than blocks.

Query `t` of kv-head group `h` attends to the keys at the positions listed in `token_indices[b, t, h]`
that are `<= t`, with one softmax. A `-1` slot is unused and a repeated position counts once; a query
whose list shows it no key outputs zeros and gets zero gradients. This is `selected_attention`'s rule
with blocks of one key, and its XLA reference is that one's (`token_attention_reference`).

GPU (Triton) body, forward and dq: a program per (b, kv group, token); its rows are the group's G query
heads, padded with zero heads to R = max(16, G) rows (a tensor-core tile's least; the wrapper holds that
padded copy of q, and of dO in the backward: 16 / G times their size for G < 16, nothing at DeepSeek's
MQA with 128 heads). It walks its list `block_k` positions at a time (sorted, repeats and later
positions dropped, so the walk stops at the list's length), loading those K/V rows by index: a gather,
never a `[T, S]` mask, and the work is T x top_k per head whatever T is.

Backward dk/dv, key-major and without atomics: the wrapper builds the inverse map, for each tile of
`block_k` consecutive keys the distinct tokens that listed any of its keys, each with a `block_k`-bit
mask of which (a sort of the (tile, token) pairs, then one sum per run: a token lists a key at most
once, so the sum of its bits is their OR). A program per key tile gathers `pairs_per_step` tokens' rows
at a time and keeps only the masked columns. The map costs a sort of B * Hkv * T * top_k entries, the
size of the lists themselves.

No TPU body: Mosaic has no gather of rows from VMEM by a vector of indices, so on TPU token-level
selection runs as blocks (DSA's `dsa.block_size` > 1 through `selected_attention`) or in XLA; lowering
this kernel for TPU fails with that reason.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import check_implementation, dispatch, in_shard_map, interpret_param, out_struct
from pallas_kernels._reference import MASK_VALUE, XLA_CHUNK
from pallas_kernels._sparse_common import (
  check_listed_args,
  finish,
  online_step,
  probs_and_dscores,
  visible_lists,
)
from pallas_kernels.selected_attention import selected_attention_reference

_DIMS_0 = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static choices of one call: hashable, so it is a `nondiff_argnums` of the custom_vjp."""
  rows: int  # R: the group's query heads padded with zero heads
  block_k: int  # listed keys per step of the forward and dq; keys per tile of dk/dv (<= 32: a bit each)
  pairs_per_step: int  # tokens a dk/dv step gathers (R * pairs_per_step rows)
  sm_scale: float
  interpret: bool
  num_warps: int
  num_stages: int


def token_attention_reference(q_BTHD, k_BSKD, v_BSKD, token_indices_BTKn, *, sm_scale: float | None = None,
                              qpos_BT: jax.Array | None = None, chunk: int | None = XLA_CHUNK) -> jax.Array:
  """The rule in XLA: `selected_attention_reference` with blocks of one key (gathers each query's listed
  K/V rows `chunk` queries at a time; `qpos_BT` places the queries, for decoding)."""
  return selected_attention_reference(q_BTHD, k_BSKD, v_BSKD, token_indices_BTKn, block_size=1,
                                      sm_scale=sm_scale, qpos_BT=qpos_BT, chunk=chunk)


# ----------------------------------------------------------------------------- lists and inverse map


def _lists(idx_BTKn: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """`[B, K, T, width]` canonical lists without positions after the token, and their lengths."""
  idx_BKTn = visible_lists(idx_BTKn, 1)
  n = idx_BKTn.shape[-1]
  idx_BKTn = jnp.pad(idx_BKTn, ((0, 0),) * 3 + ((0, width - n),), constant_values=-1)
  return idx_BKTn, jnp.sum(idx_BKTn >= 0, axis=-1, dtype=jnp.int32)


def _inverse_map(idx_BKTn: jax.Array, num_tiles: int, block_k: int, step: int):
  """Key tile -> (token, bitmask) pairs, CSR per (b, kv group): the pairs' tokens and masks `[B, K, P]`
  (sorted by tile, then token; P = T * n rounded up to `step`, unused pairs at the end) and each tile's
  first pair `[B, K, num_tiles + 1]`."""
  B, K, T, n = idx_BKTn.shape
  P = -(-T * n // step) * step
  valid_BKTn = idx_BKTn >= 0
  tile_BKX = jnp.where(valid_BKTn, idx_BKTn // block_k, num_tiles).reshape(B, K, T * n)
  bit_BKX = jnp.where(valid_BKTn, jnp.left_shift(1, idx_BKTn % block_k), 0).reshape(B, K, T * n)
  tok_BKX = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, n)).reshape(T * n)
  tile_BKX, tok_BKX, bit_BKX = jax.lax.sort((tile_BKX, jnp.broadcast_to(tok_BKX, tile_BKX.shape), bit_BKX),
                                            num_keys=2)

  def runs(tile_X, tok_X, bit_X):
    new_X = jnp.concatenate([jnp.ones((1,), bool), (tile_X[1:] != tile_X[:-1]) | (tok_X[1:] != tok_X[:-1])])
    run_X = jnp.cumsum(new_X) - 1
    bits_P = jax.ops.segment_sum(bit_X, run_X, num_segments=P)
    tile_P = jnp.full((P,), num_tiles, jnp.int32).at[run_X].set(tile_X)
    tok_P = jnp.zeros((P,), jnp.int32).at[run_X].set(tok_X)
    start_J = jnp.searchsorted(tile_P, jnp.arange(num_tiles + 1), side='left')
    return tok_P, bits_P.astype(jnp.int32), start_J.astype(jnp.int32)
  return jax.vmap(jax.vmap(runs))(tile_BKX, tok_BKX, bit_BKX)


# ----------------------------------------------------------------------------- GPU (Triton) bodies


def _walk(idx_ref, count, c, block_k):
  """Step `c` of a token's list: the positions (clamped to a valid row) and which are listed."""
  cols_C = idx_ref[pl.ds(c * block_k, block_k)]
  live_C = c * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0) < count
  return jnp.maximum(cols_C, 0), live_C


def _fwd_kernel(count_ref, q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, plan):
  R, D = q_ref.shape
  count, q_RD = count_ref[0], q_ref[...]

  def body(c, carry):
    cols_C, live_C = _walk(idx_ref, count, c, plan.block_k)
    visible_RC = jnp.broadcast_to(live_C[None, :], (R, plan.block_k))
    return online_step(q_RD, k_ref[cols_C, :], v_ref[cols_C, :], visible_RC, *carry, plan.sm_scale)

  init = (jnp.full((R, 1), MASK_VALUE, jnp.float32), jnp.zeros((R, 1), jnp.float32),
          jnp.zeros((R, D), jnp.float32))
  o_RD, lse_R1 = finish(*jax.lax.fori_loop(0, pl.cdiv(count, plan.block_k), body, init))
  o_ref[...] = o_RD.astype(o_ref.dtype)
  lse_ref[...] = lse_R1


def _dq_kernel(count_ref, q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *, plan):
  R = q_ref.shape[0]
  count, q_RD, do_RD, lse_R1, delta_R1 = count_ref[0], q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(c, dq_RD):
    cols_C, live_C = _walk(idx_ref, count, c, plan.block_k)
    k_CD = k_ref[cols_C, :]
    visible_RC = jnp.broadcast_to(live_C[None, :], (R, plan.block_k))
    _, ds_RC = probs_and_dscores(q_RD, k_CD, v_ref[cols_C, :], do_RD, lse_R1, delta_R1, visible_RC,
                                 plan.sm_scale)
    return dq_RD + jnp.dot(ds_RC.astype(k_CD.dtype), k_CD, preferred_element_type=jnp.float32)

  dq_RD = jax.lax.fori_loop(0, pl.cdiv(count, plan.block_k), body, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = dq_RD.astype(dq_ref.dtype)


def _dkdv_kernel(start_ref, tok_ref, bits_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, plan):
  j = pl.program_id(2)
  R, C, M = plan.rows, plan.block_k, plan.rows * plan.pairs_per_step
  k_CD, v_CD = k_ref[...], v_ref[...]
  first, end = start_ref[j], start_ref[j + 1]
  row_M = jax.lax.broadcasted_iota(jnp.int32, (M,), 0)

  def body(step, carry):
    dk_CD, dv_CD = carry
    pair_M = first + step * plan.pairs_per_step + row_M // R  # each pair's R rows, token-major
    live_M = pair_M < end
    pair_M = jnp.minimum(pair_M, end - 1)
    rows_M = tok_ref[pair_M] * R + row_M % R
    col_1C = jax.lax.broadcasted_iota(jnp.int32, (1, C), 1)
    listed_MC = jnp.bitwise_and(jnp.right_shift(bits_ref[pair_M][:, None], col_1C), 1) == 1
    visible_MC = live_M[:, None] & listed_MC
    q_MD, do_MD = q_ref[rows_M, :], do_ref[rows_M, :]
    p_MC, ds_MC = probs_and_dscores(q_MD, k_CD, v_CD, do_MD, lse_ref[rows_M][:, None],
                                    delta_ref[rows_M][:, None], visible_MC, plan.sm_scale)
    dv_CD += jax.lax.dot_general(p_MC.astype(do_MD.dtype), do_MD, _DIMS_0, preferred_element_type=jnp.float32)
    dk_CD += jax.lax.dot_general(ds_MC.astype(q_MD.dtype), q_MD, _DIMS_0, preferred_element_type=jnp.float32)
    return dk_CD, dv_CD

  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk_CD, dv_CD = jax.lax.fori_loop(0, pl.cdiv(end - first, plan.pairs_per_step), body, (zeros, zeros))
  dk_ref[...] = dk_CD.astype(dk_ref.dtype)
  dv_ref[...] = dv_CD.astype(dv_ref.dtype)


def _params(plan: _Plan) -> dict:
  return dict(compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
              interpret=interpret_param(plan.interpret, 'gpu'))


def _list_of(h, num_lists: int):
  """The list index of kv group h: its own, or 0 when one list serves every group."""
  return h if num_lists > 1 else 0


def _token_specs(R, S, D, n, num_lists):
  """Grid (b, h, t): a token's rows of `[B, K, T * R, width]`, a (b, h)'s whole K or V, a token's list
  and its length (of `[B, num_lists, T, ...]`)."""
  def rows(width):
    return pl.BlockSpec((None, None, R, width), lambda b, h, t: (b, h, t, 0))
  whole_kv = pl.BlockSpec((None, None, S, D), lambda b, h, t: (b, h, 0, 0))
  one = pl.BlockSpec((None, None, None, 1), lambda b, h, t: (b, _list_of(h, num_lists), t, 0))
  lists = pl.BlockSpec((None, None, None, n), lambda b, h, t: (b, _list_of(h, num_lists), t, 0))
  return rows, whole_kv, one, lists


def _forward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKTn, count_BKT):
  B, K = q_BKMD.shape[:2]
  T, n = idx_BKTn.shape[2:]
  S, D = k_BKSD.shape[2:]
  rows, whole_kv, one, lists = _token_specs(plan.rows, S, D, n, idx_BKTn.shape[1])
  return pl.pallas_call(
      functools.partial(_fwd_kernel, plan=plan),
      grid=(B, K, T),
      in_specs=[one, rows(D), whole_kv, whole_kv, lists],
      out_specs=[rows(D), rows(1)],
      out_shape=[out_struct(q_BKMD.shape, q_BKMD.dtype, q_BKMD, k_BKSD, v_BKSD),
                 out_struct((*q_BKMD.shape[:3], 1), jnp.float32, q_BKMD, k_BKSD, v_BKSD)],
      name='token_attention_fwd', **_params(plan),
  )(count_BKT[..., None], q_BKMD, k_BKSD, v_BKSD, idx_BKTn)


def _backward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKTn, count_BKT, do_BKMD, lse_BKM, delta_BKM):
  B, K = q_BKMD.shape[:2]
  Kl, T, n = idx_BKTn.shape[1:]
  S, D = k_BKSD.shape[2:]
  M = T * plan.rows
  rows, whole_kv, one, lists = _token_specs(plan.rows, S, D, n, Kl)
  dq_BKMD = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan),
      grid=(B, K, T),
      in_specs=[one, rows(D), whole_kv, whole_kv, lists, rows(D), rows(1), rows(1)],
      out_specs=rows(D),
      out_shape=out_struct(q_BKMD.shape, q_BKMD.dtype, q_BKMD, k_BKSD, do_BKMD),
      name='token_attention_dq', **_params(plan),
  )(count_BKT[..., None], q_BKMD, k_BKSD, v_BKSD, idx_BKTn, do_BKMD, lse_BKM[..., None], delta_BKM[..., None])

  NJ = S // plan.block_k
  tok_BKP, bits_BKP, start_BKJ = _inverse_map(idx_BKTn, NJ, plan.block_k, plan.pairs_per_step)
  P = tok_BKP.shape[-1]
  def whole(shape, num=K):
    return pl.BlockSpec((None, None, *shape), lambda b, h, j: (b, _list_of(h, num)) + (0,) * len(shape))
  kv_tile = pl.BlockSpec((None, None, plan.block_k, D), lambda b, h, j: (b, h, j, 0))
  dk_BKSD, dv_BKSD = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=plan),
      grid=(B, K, NJ),
      in_specs=[whole((NJ + 1,), Kl), whole((P,), Kl), whole((P,), Kl), whole((M, D)), kv_tile, kv_tile,
                whole((M, D)), whole((M,)), whole((M,))],
      out_specs=[kv_tile, kv_tile],
      out_shape=[out_struct(x.shape, x.dtype, q_BKMD, k_BKSD, do_BKMD) for x in (k_BKSD, v_BKSD)],
      name='token_attention_dkdv', **_params(plan),
  )(start_BKJ, tok_BKP, bits_BKP, q_BKMD, k_BKSD, v_BKSD, do_BKMD, lse_BKM, delta_BKM)
  return dq_BKMD, dk_BKSD, dv_BKSD


# ----------------------------------------------------------------------------- custom_vjp


def _to_rows(plan: _Plan, x_BTHx: jax.Array, K: int) -> jax.Array:
  """[B, T, H, ...] -> [B, K, T * R, ...]: each token's group of G heads padded to R rows."""
  B, T, H = x_BTHx.shape[:3]
  rest = x_BTHx.shape[3:]
  x = x_BTHx.reshape(B, T, K, H // K, *rest)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, plan.rows - H // K)) + ((0, 0),) * len(rest))
  return jnp.moveaxis(x, 2, 1).reshape(B, K, T * plan.rows, *rest)


def _from_rows(plan: _Plan, x_BKMD: jax.Array, H: int) -> jax.Array:
  B, K, _, D = x_BKMD.shape
  x_BTKGD = x_BKMD.reshape(B, K, -1, plan.rows, D).transpose(0, 2, 1, 3, 4)[:, :, :, :H // K]
  return x_BTKGD.reshape(B, -1, H, D)


def _operands(plan: _Plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn):
  """q as rows, K/V as [B, K, S padded to block_k, D], the lists padded to a power of two of steps."""
  S, K, n = k_BSKD.shape[1], k_BSKD.shape[2], idx_BTKn.shape[-1]
  idx_BKTn, count_BKT = _lists(idx_BTKn, pl.next_power_of_2(max(n, plan.block_k)))
  Sp = -(-S // plan.block_k) * plan.block_k
  k_BKSD, v_BKSD = (jnp.pad(x, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                    for x in (k_BSKD, v_BSKD))
  return _to_rows(plan, q_BTHD, K), k_BKSD, v_BKSD, idx_BKTn, count_BKT


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _planned(plan: _Plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn):
  return _planned_fwd(plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn)[0]


def _planned_fwd(plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn):
  o_BKMD, lse_BKM1 = _forward(plan, *_operands(plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn))
  o_BTHD = _from_rows(plan, o_BKMD, q_BTHD.shape[2])
  return o_BTHD, (q_BTHD, k_BSKD, v_BSKD, idx_BTKn.astype(jnp.int32), o_BTHD, lse_BKM1[..., 0])


def _planned_bwd(plan, residuals, do_BTHD):
  # As selected_attention's: rebuild the operands from the residuals rather than keep the forward's.
  q_BTHD, k_BSKD, v_BSKD, idx_BTKn, o_BTHD, lse_BKM = jax.lax.optimization_barrier(residuals)
  S, H, K = k_BSKD.shape[1], q_BTHD.shape[2], k_BSKD.shape[2]
  q_BKMD, k_BKSD, v_BKSD, idx_BKTn, count_BKT = _operands(plan, q_BTHD, k_BSKD, v_BSKD, idx_BTKn)
  delta_BTH1 = jnp.sum(do_BTHD.astype(jnp.float32) * o_BTHD.astype(jnp.float32), axis=-1, keepdims=True)
  dq_BKMD, dk_BKSD, dv_BKSD = _backward(plan, q_BKMD, k_BKSD, v_BKSD, idx_BKTn, count_BKT,
                                        _to_rows(plan, do_BTHD.astype(q_BTHD.dtype), K), lse_BKM,
                                        _to_rows(plan, delta_BTH1, K)[..., 0])
  dk_BSKD, dv_BSKD = (x.transpose(0, 2, 1, 3)[:, :S] for x in (dk_BKSD, dv_BKSD))
  return _from_rows(plan, dq_BKMD, H), dk_BSKD, dv_BSKD, None


_planned.defvjp(_planned_fwd, _planned_bwd)


# ----------------------------------------------------------------------------- public function


def _check_compiled_shapes(plan: _Plan, D: int) -> None:
  """Tile rules of the compiled Triton body (interpret mode runs any shape)."""
  sizes = dict(head_dim=D, block_k=plan.block_k, rows=plan.rows * plan.pairs_per_step)
  if any(x < 16 or x & (x - 1) for x in sizes.values()):
    raise ValueError(f'the Triton body of token_attention needs powers of two >= 16: {sizes}')


def token_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, token_indices_BTKn: jax.Array,
                    *, sm_scale: float | None = None, implementation: str = 'pallas',
                    interpret: bool | None = None, backend: str | None = None, block_k: int = 16,
                    pairs_per_step: int | None = None, num_warps: int = 4, num_stages: int = 2) -> jax.Array:
  """Attention of each query to its listed tokens, `[B, T, Hq, D]` (the rule: the module docstring).

  `block_k` (<= 32): listed keys per forward/dq step and keys per dk/dv tile; `pairs_per_step`: tokens a
  dk/dv step gathers (default: 64 rows' worth). Both untuned. `num_warps`/`num_stages`: Triton.
  """
  check_implementation(implementation)
  check_listed_args('token_attention', q_BTHD, k_BSKD, v_BSKD, token_indices_BTKn, 'token_indices')
  H, D, K = q_BTHD.shape[2], q_BTHD.shape[3], k_BSKD.shape[2]
  if not 1 <= block_k <= 32:
    raise ValueError(f'token_attention: block_k={block_k} must be in 1..32 (a bit of a mask per key)')
  if implementation == 'xla':
    return token_attention_reference(q_BTHD, k_BSKD, v_BSKD, token_indices_BTKn, sm_scale=sm_scale)

  def build(body: str, interpreted: bool):
    if body == 'tpu':
      raise ValueError('token_attention has no TPU body (Mosaic cannot gather rows by a vector of '
                       'indices): select blocks (dsa.block_size > 1) or use implementation="xla"')
    if interpreted and in_shard_map(q_BTHD, k_BSKD, v_BSKD):  # JAX's interpreter cannot run in shard_map
      return functools.partial(token_attention_reference, sm_scale=sm_scale)
    R = max(16, pl.next_power_of_2(H // K))
    plan = _Plan(rows=R, block_k=block_k, pairs_per_step=pairs_per_step or max(1, 64 // R),
                 sm_scale=D**-0.5 if sm_scale is None else sm_scale, interpret=interpreted,
                 num_warps=num_warps, num_stages=num_stages)
    if not interpreted:
      _check_compiled_shapes(plan, D)
    return functools.partial(_planned, plan)
  return dispatch(build, (q_BTHD, k_BSKD, v_BSKD, token_indices_BTKn),
                  jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), backend=backend, interpret=interpret)
