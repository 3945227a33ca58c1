"""Flash attention (FlashAttention-2, Dao 2023, arXiv:2307.08691) with grouped-query heads, causal and
sliding-window masks, as Pallas kernels for GPU (Triton) and TPU (Mosaic), beside its XLA reference.

Positions. Query `t` sits at position `t + offset` and key `s` at position `s`. With `causal=True` the
queries are aligned to the END of the keys, `offset = S - T` (as when decoding the last T of S tokens;
`T <= S` is required), and query `t` keeps the keys at positions `<= t + offset`; `window=w` further keeps
only the `w` most recent of them, `t + offset - w < s`. With `causal=False` every query sees every key and
a window is rejected (a window without a causal side is not used anywhere in this project).
`flash_attention_with_lse(..., key_positions=(stride, first))` places key `s` at `first + s * stride` and
query `t` at `t` (NSA's compressed keys sit at the last token of their blocks, see compressed_attention.py);
a query that sees no key there outputs zeros and has log-sum-exp -inf.

Segments. `segment_ids` (int32, [B, T] for self-attention, or a pair: queries' [B, T] and keys' [B, S])
keep each query to the keys of its own segment, on top of the masks above: the documents of a packed row
(`data.packing`) never see each other. Each segment must be one contiguous run of positions (every packer
here makes them so; 0 is padding, a run like any other). The kernels then skip whole tiles: a query block
starts its key loop at the block holding the start of its first query's segment, and a key block's
dk/dv loop stops at the query block holding the end of its last key's segment, so a row of many short
documents costs about what the documents cost alone. The kernels take segments for self-attention
(T == S) and for strided keys (`key_positions`, NSA's compressed keys: key `s` then belongs to the
segment of position `s * stride`); the XLA reference takes any.

Kernels. The forward pass runs the online softmax over key blocks and saves the log-sum-exp per query;
the backward pass recomputes the probabilities from it in two kernels, one for dq (per query block, a
loop over key blocks) and one for dk/dv (per key block, a loop over the query heads of its kv group and
over query blocks, so dk/dv are summed over the group inside the kernel and never materialised per query
head). Key blocks that the mask hides entirely are never computed: for a query block the key loop runs
only over `[first block inside the window, diagonal block]` (and the dk/dv loop over the matching query
blocks). K/V are never repeated for GQA: the kv head of query head `h` is `h // G`, chosen in the
BlockSpec index maps. Sequences that are not a multiple of the block are zero-padded; padded keys are
masked, padded queries are sliced off (their cotangent is zero, so they add nothing to dk/dv).

- GPU (Triton): grid (query block, batch, head); K/V of the whole sequence stay in HBM and the kernel
  loops over the visible key blocks with `fori_loop`. Works on the [B, T, H, D] layout directly.
- TPU (Mosaic): the key loop is the last grid axis, shrunk to the widest visible span; steps past the
  span are skipped with `pl.when` and their index maps are clamped to the last visible block, so a
  skipped step fetches nothing new (the scheme of JAX's splash attention). Mosaic tiles the last two
  block dims in (8, 128), so the wrapper transposes to [B, H, T, D]. Running max and sum are kept
  replicated over the 128 lanes, as JAX's TPU kernels do.

Shape letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K, D head dim;
inside kernels Q is a query block and C a key block (chunk).
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
from pallas_kernels.block_choice import segment_ends, segment_starts

# (block_q, block_k), used by the forward and both backward kernels. Not tuned for speed (no accelerator was
# at hand); the GPU choice is the one that compiles without register spills. Deviceless compiles for H100
# and A100 (`python -m sparse_lm.compile`, ptxas -v) at B=1, T=4096, Hq=8, Hkv=2, bf16, causal, of
# (64, 64), (128, 64) and (64, 128) blocks with 4 or 8 warps and 2 or 3 stages: only 8 warps, 2 stages
# and (64, 64) keep all three kernels spill-free at head_dim 64 and 128 on both (most registers:
# dkv 250 of 255 on H100 at D=128, 255 with 0 spills on A100 at D=64). With 4 warps the dkv kernel's
# two [block_k, D] float32 accumulators alone take 128 registers a thread at D=128, and it spilled
# 216 bytes on H100; 3 stages add shared memory (A100 refuses (128, 64) at D=128: 198,656 bytes of 166,912).
DEFAULT_BLOCKS = {'gpu': (64, 64), 'tpu': (256, 512)}
GPU_NUM_WARPS, GPU_NUM_STAGES = 8, 2
COMPILED_HEAD_DIMS = (64, 128)
_LANES = 128


# ----------------------------------------------------------------------------------------------------
# Reference and the mask both sides share.


def _keep(qpos, kpos, *, causal: bool, window: int | None, qseg=None, kseg=None):
  """Which (query, key) pairs attend, by position and segment; None when all do."""
  keep = None
  if causal:
    keep = kpos <= qpos
  if window is not None:
    keep &= kpos > qpos - window
  if qseg is not None:
    same = qseg == kseg
    keep = same if keep is None else keep & same
  return keep


def flash_attention_reference(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
                              causal: bool = True, window: int | None = None, sm_scale: float | None = None,
                              qpos_BT: jax.Array | None = None, kpos_BS: jax.Array | None = None,
                              segment_ids=None) -> jax.Array:
  """`flash_attention` in XLA, the `implementation='xla'` path (see `attention_with_lse_reference`)."""
  return attention_with_lse_reference(q_BTHD, k_BSKD, v_BSKD, causal=causal, window=window, sm_scale=sm_scale,
                                      qpos_BT=qpos_BT, kpos_BS=kpos_BS, segment_ids=segment_ids)[0]


def _segment_pair(segment_ids, T: int, S: int):
  """(queries' [B, T], keys' [B, S]) int32 segment ids from `segment_ids` (one array when T == S, or a
  pair), or None."""
  if segment_ids is None:
    return None
  qseg, kseg = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
  if qseg.shape[1:] != (T,) or kseg.shape[1:] != (S,) or qseg.shape[0] != kseg.shape[0]:
    raise ValueError(f'segment_ids {qseg.shape} and {kseg.shape} must be [B, T={T}] and [B, S={S}]')
  return qseg.astype(jnp.int32), kseg.astype(jnp.int32)


def attention_with_lse_reference(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
                                 causal: bool = True, window: int | None = None,
                                 key_positions: tuple[int, int] | None = None, sm_scale: float | None = None,
                                 qpos_BT: jax.Array | None = None, kpos_BS: jax.Array | None = None,
                                 segment_ids=None, chunk: int = XLA_CHUNK) -> tuple[jax.Array, jax.Array]:
  """`flash_attention_with_lse` in XLA: the output and the float32 log-sum-exp `[B, H, T]`, float32
  softmax and products, in memory linear in T. A window over a whole sequence runs in chunks of
  `window` queries, each against its own chunk and the one before (which hold all its keys); other
  calls run `chunk` queries at a time (`map_query_chunks`, rematerialised in the backward).
  `qpos_BT` / `kpos_BS` place queries and keys explicitly (decoding: new tokens against a cache, or a
  slice of one), overriding the positions of the module docstring; `segment_ids` as in the module
  docstring (any layout here)."""
  _check_args(q_BTHD, k_BSKD, v_BSKD, causal, window, key_positions, explicit=kpos_BS is not None)
  B, T, H, D = q_BTHD.shape
  S = k_BSKD.shape[1]
  scale = D**-0.5 if sm_scale is None else sm_scale
  segments = _segment_pair(segment_ids, T, S)
  if window is not None and window < S == T and qpos_BT is None and kpos_BS is None:
    return _local_reference(q_BTHD, k_BSKD, v_BSKD, window, scale, segments)
  if kpos_BS is None:
    stride, first = key_positions or (1, 0)
    kpos_BS = jnp.broadcast_to(jnp.arange(S) * stride + first, (B, S))
  if qpos_BT is None:
    qpos_BT = jnp.arange(T) + (S - T if causal and key_positions is None else 0)
  qpos_BT = jnp.broadcast_to(qpos_BT, (B, T))
  qseg_BT, kseg_BS = segments if segments is not None else (jnp.zeros((B, T), jnp.int32), None)

  def one_chunk(q_BQHD, qpos_BQ, qseg_BQ):
    keep_BQS = _keep(qpos_BQ[:, :, None], kpos_BS[:, None, :], causal=causal, window=window,
                     qseg=None if kseg_BS is None else qseg_BQ[:, :, None],
                     kseg=None if kseg_BS is None else kseg_BS[:, None, :])
    if keep_BQS is None:
      keep_BQS = jnp.ones((B, q_BQHD.shape[1], S), bool)
    o_BQHD, lse_BHQ = _masked_softmax_attention(q_BQHD, k_BSKD, v_BSKD, keep_BQS, scale)
    return o_BQHD, lse_BHQ.transpose(0, 2, 1)
  # Padded queries sit at position -1, before every key (a causal mask hides all of them).
  o_BTHD, lse_BTH = map_query_chunks(one_chunk, (q_BTHD, qpos_BT, qseg_BT), (0, -1, -1), chunk=chunk)
  return o_BTHD, lse_BTH.transpose(0, 2, 1)


def _masked_softmax_attention(q_BTHD, k_BSKD, v_BSKD, keep_BTS, scale: float):
  """Softmax attention where `keep_BTS` allows; a query with no key kept gets zeros and lse -inf, its
  log-sum-exp taken over zeros instead, so neither value nor gradient is ever NaN."""
  B, T, H, D = q_BTHD.shape
  K = k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
  s_BKGTS = jnp.einsum('btkgd,bskd->bkgts', q_BTKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
  keep_B11TS = keep_BTS[:, None, None]
  seen_B11T1 = keep_B11TS.any(axis=-1, keepdims=True)
  s_BKGTS = jnp.where(keep_B11TS, s_BKGTS, -jnp.inf)
  lse_BKGT = jax.nn.logsumexp(jnp.where(seen_B11T1, s_BKGTS, 0.0), axis=-1)
  p_BKGTS = jnp.exp(s_BKGTS - lse_BKGT[..., None])
  o_BTKGD = jnp.einsum('bkgts,bskd->btkgd', p_BKGTS, v_BSKD.astype(jnp.float32))
  lse_BKGT = jnp.where(seen_B11T1[..., 0], lse_BKGT, -jnp.inf)
  return o_BTKGD.reshape(B, T, H, D).astype(q_BTHD.dtype), lse_BKGT.reshape(B, H, T)


def _local_reference(q_BTHD, k_BTKD, v_BTKD, window: int, scale: float, segments=None):
  """Causal sliding-window attention in chunks of `window` queries (N of them), each seeing its own
  chunk and the one before: `[N, window, 2 window]` scores instead of `[T, T]`; `segments` (queries'
  and keys' ids) masked there too."""
  B, T, H, D = q_BTHD.shape
  K = k_BTKD.shape[2]
  N = -(-T // window)
  pad = ((0, 0), (0, N * window - T), (0, 0), (0, 0))

  def with_previous_chunk(x_BTKD):  # [B, N, 2 window, K, D]
    x_BNQKD = jnp.pad(x_BTKD, pad).reshape(B, N, window, K, D)
    prev_BNQKD = jnp.pad(x_BNQKD, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
    return jnp.concatenate([prev_BNQKD, x_BNQKD], axis=2)
  q_XQHD = jnp.pad(q_BTHD, pad).reshape(B * N, window, H, D)
  k_XLKD, v_XLKD = (with_previous_chunk(x).reshape(B * N, 2 * window, K, D) for x in (k_BTKD, v_BTKD))
  qpos_NQ = jnp.arange(N)[:, None] * window + jnp.arange(window)[None, :]
  kpos_NL = jnp.arange(N)[:, None] * window - window + jnp.arange(2 * window)[None, :]
  keep_NQL = _keep(qpos_NQ[:, :, None], kpos_NL[:, None, :], causal=True, window=window)
  keep_NQL &= (kpos_NL >= 0)[:, None]
  keep_BNQL = jnp.broadcast_to(keep_NQL[None], (B, N, window, 2 * window))
  if segments is not None:
    qseg_BT, kseg_BT = segments
    qseg_BNQ = jnp.pad(qseg_BT, ((0, 0), (0, N * window - T)), constant_values=-1).reshape(B, N, window)
    kseg_BNQ = jnp.pad(kseg_BT, ((0, 0), (0, N * window - T)), constant_values=-2).reshape(B, N, window)
    kseg_BNL = jnp.concatenate([jnp.pad(kseg_BNQ, ((0, 0), (1, 0), (0, 0)), constant_values=-2)[:, :-1],
                                kseg_BNQ], axis=2)
    keep_BNQL &= qseg_BNQ[..., None] == kseg_BNL[:, :, None, :]
  keep_XQL = keep_BNQL.reshape(B * N, window, 2 * window)
  o_XQHD, lse_XHQ = _masked_softmax_attention(q_XQHD, k_XLKD, v_XLKD, keep_XQL, scale)
  o_BTHD = o_XQHD.reshape(B, N * window, H, D)[:, :T]
  lse_BHT = lse_XHQ.reshape(B, N, H, window).transpose(0, 2, 1, 3).reshape(B, H, N * window)[..., :T]
  return o_BTHD, lse_BHT


# ----------------------------------------------------------------------------------------------------
# Public entry point, static configuration and the custom VJP.


def flash_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *, causal: bool = True,
                    window: int | None = None, sm_scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, implementation: str = 'pallas', interpret: bool | None = None,
                    backend: str | None = None, num_warps: int = GPU_NUM_WARPS,
                    num_stages: int = GPU_NUM_STAGES, segment_ids=None) -> jax.Array:
  """Softmax attention, [B, T, H, D] x [B, S, K, D] -> [B, T, H, D]; positions and segments as in the
  module docstring.

  `sm_scale` (a Python float) defaults to D**-0.5. `block_q`/`block_k` default per backend
  (`DEFAULT_BLOCKS`), serve the forward and both backward kernels, and are clipped to the smallest legal
  block covering the sequence. Compiled bodies take D in `COMPILED_HEAD_DIMS` and blocks that are powers
  of two >= 16 (GPU) or multiples of 128 (TPU); interpret mode takes any D <= 128 and multiples of 8.
  `num_warps` / `num_stages`: the Triton body's (defaults: `GPU_NUM_WARPS`, `GPU_NUM_STAGES`).
  """
  return flash_attention_with_lse(
      q_BTHD, k_BSKD, v_BSKD, causal=causal, window=window, sm_scale=sm_scale, block_q=block_q,
      block_k=block_k, implementation=implementation, interpret=interpret, backend=backend,
      num_warps=num_warps, num_stages=num_stages, segment_ids=segment_ids)[0]


def flash_attention_with_lse(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, *,
                             causal: bool = True, window: int | None = None,
                             key_positions: tuple[int, int] | None = None, sm_scale: float | None = None,
                             block_q: int | None = None, block_k: int | None = None,
                             implementation: str = 'pallas', interpret: bool | None = None,
                             backend: str | None = None, num_warps: int = GPU_NUM_WARPS,
                             num_stages: int = GPU_NUM_STAGES, segment_ids=None
                             ) -> tuple[jax.Array, jax.Array]:
  """`flash_attention` that also returns the float32 log-sum-exp of each query's logits, `[B, H, T]`
  (-inf where a query sees no key), differentiable like the output; `key_positions=(stride, first)`
  puts key `s` at position `first + s * stride` (causal only, no window)."""
  check_implementation(implementation)
  if implementation == 'xla':
    return attention_with_lse_reference(q_BTHD, k_BSKD, v_BSKD, causal=causal, window=window,
                                        key_positions=key_positions, sm_scale=sm_scale,
                                        segment_ids=segment_ids)
  _check_args(q_BTHD, k_BSKD, v_BSKD, causal, window, key_positions)
  B, T, H, _ = q_BTHD.shape
  S = k_BSKD.shape[1]
  segments = _segment_pair(segment_ids, T, S)
  if segments is not None and key_positions is None and T != S:
    raise ValueError(f'segment_ids: the kernels take them for self-attention (T == S) or for strided keys '
                     f'(key_positions); got T={T}, S={S}')
  if segments is not None and key_positions is not None and (S - 1) * key_positions[0] >= T:
    raise ValueError(f'segment_ids with key_positions={key_positions}: key {S - 1} starts at position '
                     f'{(S - 1) * key_positions[0]}, past the {T} queries')
  seg_args = () if segments is None else segments

  def build(body: str, interpreted: bool):
    if interpreted and in_shard_map(q_BTHD, k_BSKD, v_BSKD):  # JAX's interpreter cannot run in shard_map
      reference = functools.partial(attention_with_lse_reference, causal=causal, window=window,
                                    key_positions=key_positions, sm_scale=sm_scale)
      return lambda q, k, v, *seg: reference(q, k, v, segment_ids=seg or None)
    plan = _make_plan(q_BTHD.shape, k_BSKD.shape, causal=causal, window=window,
                       key_positions=key_positions, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
                       interpret=interpreted, backend=body, num_warps=num_warps, num_stages=num_stages,
                       segmented=segments is not None)
    return lambda q, k, v, *seg: _flash(q, k, v, seg, plan)
  out = (jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32))
  return dispatch(build, (q_BTHD, k_BSKD, v_BSKD, *seg_args), out, backend=backend, interpret=interpret)


def computed_tiles(seq_len: int, *, block_q: int, block_k: int, window: int | None = None,
                   segment_ids=None, key_positions: tuple[int, int] | None = None) -> int:
  """The (query block, key block) tiles the forward kernel computes for one head of each row, summed over
  the rows: from the same bounds the kernels loop over (causal self-attention, T == S; or NSA's
  compressed keys, `key_positions=(stride, first)`, `(seq_len - first - 1) // stride + 1` of them). A
  tile is `4 * block_q * block_k * D` FLOPs forward, so this is the kernel's work as its grid does it,
  not an estimate from the mask."""
  B = 1 if segment_ids is None else segment_ids.shape[0]
  stride, first = key_positions or (1, 0)
  kv_len = (seq_len - first - 1) // stride + 1 if key_positions else seq_len
  plan = _Plan(causal=True, window=window, sm_scale=1.0, block_q=block_q, block_k=block_k, q_len=seq_len,
               kv_len=kv_len, group=1, backend='gpu', interpret=True, key_stride=stride, key_first=first,
               segmented=segment_ids is not None)
  firsts = None
  if segment_ids is not None:
    kseg = segment_ids[:, :kv_len * stride:stride]
    firsts = np.asarray(_segments(segment_ids, kseg, plan).first_kv_block)
  total = 0
  for b in range(B):
    for i in range(plan.num_q_blocks):
      first_block = None if firsts is None else int(firsts[b * plan.num_q_blocks + i])
      lo, hi = _kv_blocks(i, plan, _Static, first=first_block)
      total += max(hi - lo, 0)
  return total


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call; hashable, so it can be a non-differentiable custom_vjp argument."""
  causal: bool
  window: int | None
  sm_scale: float
  block_q: int
  block_k: int
  q_len: int
  kv_len: int
  group: int
  backend: str
  interpret: bool
  num_warps: int = GPU_NUM_WARPS
  num_stages: int = GPU_NUM_STAGES
  key_stride: int = 1  # key s sits at position key_first + s * key_stride
  key_first: int = 0
  segmented: bool = False  # segment ids given: masked by them, and tiles outside a segment skipped

  @property
  def kernel_name(self) -> str:
    """What compile reports call the kernels: strided keys are NSA's compressed attention."""
    return 'compressed_attention' if self.strided else 'flash_attention'

  @property
  def strided(self) -> bool:
    return (self.key_stride, self.key_first) != (1, 0)

  @property
  def offset(self) -> int:
    """Position of query 0: causal queries align to the end of plain keys, and start at 0 otherwise."""
    return self.kv_len - self.q_len if self.causal and not self.strided else 0

  @property
  def num_q_blocks(self) -> int:
    return pl.cdiv(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return pl.cdiv(self.kv_len, self.block_k)

  @property
  def kv_mask_len(self) -> int | None:
    """Where the zero-padded keys start, or None when the keys are not padded."""
    return None if self.kv_len % self.block_k == 0 else self.kv_len


def _check_args(q, k, v, causal: bool, window: int | None,
                key_positions: tuple[int, int] | None = None, *, explicit: bool = False) -> None:
  """`explicit`: the keys' positions are given one by one (the XLA path only), so T may exceed S."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'want q [B, T, H, D] and k, v [B, S, K, D]; got {q.shape}, {k.shape}, {v.shape}')
  (B, T, H, D), (Bk, S, K, Dk) = q.shape, k.shape
  if B != Bk or D != Dk or H % K:
    raise ValueError(f'q {q.shape} and k/v {k.shape} need equal batch and head dim and H % K == 0')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}')
  if key_positions is not None:
    stride, first = key_positions
    if not (isinstance(stride, int) and isinstance(first, int) and stride >= 1 and first >= 0):
      raise ValueError(f'key_positions={key_positions} must be (stride >= 1, first >= 0) integers')
    if not causal or window is not None:
      raise ValueError(f'key_positions={key_positions} needs causal=True and no window')
  elif causal and T > S and not explicit:
    raise ValueError(f'causal attention aligns queries to the end of the keys and needs T <= S; '
                     f'got T={T}, S={S}')
  if window is not None and (not causal or window < 1):
    raise ValueError(f'window={window} needs causal=True and window >= 1')


def _check_block(name: str, block: int, backend: str, interpret: bool) -> None:
  if block < 8 or block % 8:
    raise ValueError(f'{name}={block} must be a positive multiple of 8')
  if backend == 'gpu' and not interpret and (block < 16 or block & (block - 1)):
    raise ValueError(f'{name}={block}: the Triton body needs a power of two >= 16')
  if backend == 'tpu' and not interpret and block % _LANES:
    raise ValueError(f'{name}={block}: the TPU body needs a multiple of {_LANES}')
  if backend == 'tpu' and block > _LANES and block % _LANES:
    raise ValueError(f'{name}={block}: the TPU body needs a block <= {_LANES} or a multiple of it')


def _clip_block(block: int, length: int, backend: str) -> int:
  """No larger than the smallest legal block that covers `length`: bigger only adds padding."""
  cover = max(16, pl.next_power_of_2(length)) if backend == 'gpu' else _LANES * pl.cdiv(length, _LANES)
  return min(block, cover)


def _make_plan(q_shape, k_shape, *, causal, window, sm_scale, block_q, block_k, interpret,
                 backend, num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES,
                 key_positions=None, segmented: bool = False) -> _Plan:
  _, T, H, D = q_shape
  S, K = k_shape[1:3]
  stride, first = key_positions or (1, 0)
  if not interpret and D not in COMPILED_HEAD_DIMS:
    raise ValueError(f'head dim D={D}: the compiled {backend} body supports D in {COMPILED_HEAD_DIMS}')
  if interpret and D > _LANES:
    raise ValueError(f'head dim D={D}: interpret mode supports D <= {_LANES}')
  default_q, default_k = DEFAULT_BLOCKS[backend]
  block_q = _clip_block(block_q or default_q, T, backend)
  block_k = _clip_block(block_k or default_k, S, backend)
  _check_block('block_q', block_q, backend, interpret)
  _check_block('block_k', block_k, backend, interpret)
  return _Plan(causal=causal, window=window, sm_scale=float(D**-0.5 if sm_scale is None else sm_scale),
                 block_q=block_q, block_k=block_k, q_len=T, kv_len=S, group=H // K, backend=backend,
                 interpret=interpret, num_warps=num_warps, num_stages=num_stages, key_stride=stride,
                 key_first=first, segmented=segmented)


def _pad_seq(x_BLHD: jax.Array, block: int) -> jax.Array:
  pad = -x_BLHD.shape[1] % block
  return jnp.pad(x_BLHD, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x_BLHD


@dataclasses.dataclass(frozen=True)
class _Segments:
  """What the bodies read of the segment ids: the ids of the (padded) queries and keys, and per block the
  tiles a segment can reach: `first_kv_block[b, i]`, the key block holding the start of the segment of
  query block i's first query, and `end_q_block[b, j]`, one past the query block holding the end of the
  segment of key block j's last key. Flattened to one padded row each, as the Triton body loads them."""
  q_BT: jax.Array
  k_BS: jax.Array
  first_kv_block: jax.Array  # [pow2 >= B * num_q_blocks], row-major (b, i)
  end_q_block: jax.Array  # [pow2 >= B * num_kv_blocks], row-major (b, j)


def _flat_pow2(x_BN: jax.Array) -> jax.Array:
  flat = x_BN.reshape(-1)
  return jnp.pad(flat, (0, pl.next_power_of_2(flat.size) - flat.size))


def _segments(qseg_BT, kseg_BS, plan: _Plan) -> _Segments:
  """The bodies' view of segment ids: runs by query position, their bounds per block. Key `s` belongs to
  the segment of position `s * key_stride` (itself for self-attention; the first token of its block for
  NSA's compressed keys, which the caller's `kseg_BS` must match), so a query block's keys start at the
  first key whose anchor is inside its first query's segment."""
  B, T = qseg_BT.shape
  S = kseg_BS.shape[1]
  start_BT, end_BT = segment_starts(qseg_BT), segment_ends(qseg_BT)
  first_q = jnp.minimum(jnp.arange(plan.num_q_blocks) * plan.block_q, T - 1)
  last_k = jnp.minimum(jnp.arange(plan.num_kv_blocks) * plan.block_k + plan.block_k - 1, S - 1)
  first_key_BN = lax.div(start_BT[:, first_q] + plan.key_stride - 1, plan.key_stride)
  first_kv_block = lax.div(first_key_BN, plan.block_k)
  end_q_block = lax.div(end_BT[:, last_k * plan.key_stride], plan.block_q) + 1
  pad_q, pad_k = plan.num_q_blocks * plan.block_q - T, plan.num_kv_blocks * plan.block_k - S
  return _Segments(q_BT=jnp.pad(qseg_BT, ((0, 0), (0, pad_q)), constant_values=-1),
                   k_BS=jnp.pad(kseg_BS, ((0, 0), (0, pad_k)), constant_values=-2),
                   first_kv_block=_flat_pow2(first_kv_block), end_q_block=_flat_pow2(end_q_block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BTHD, k_BSKD, v_BSKD, seg, plan: _Plan):
  return _flash_fwd(q_BTHD, k_BSKD, v_BSKD, seg, plan)[0]


def _flash_fwd(q_BTHD, k_BSKD, v_BSKD, seg, plan: _Plan):
  forward, _ = _BODIES[plan.backend]
  segments = _segments(*seg, plan) if seg else None
  o_BTHD, lse_BHT = forward(_pad_seq(q_BTHD, plan.block_q), _pad_seq(k_BSKD, plan.block_k),
                            _pad_seq(v_BSKD, plan.block_k), plan, segments)
  o_BTHD = o_BTHD[:, :plan.q_len]
  # The bodies give a query that sees no key lse = +inf, so its recomputed probabilities exp(s - lse)
  # are zeros in the backward kernels; the caller sees the log-sum-exp of nothing, -inf.
  out_lse_BHT = jnp.where(lse_BHT[:, :, :plan.q_len] == jnp.inf, -jnp.inf, lse_BHT[:, :, :plan.q_len])
  return (o_BTHD, out_lse_BHT), (q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, seg)


def _flash_bwd(plan: _Plan, res, cts):
  # The barrier keeps XLA from sharing the forward's relaid copies of q, k and v (the TPU body's
  # [B, H, T, D]) with the backward, which would keep them alive between the passes beside the originals.
  q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT, seg = jax.lax.optimization_barrier(res)
  segments = _segments(*seg, plan) if seg else None
  do_BTHD, dlse_BHT = cts
  _, backward = _BODIES[plan.backend]
  # FlashAttention-2 Alg. 2: D = rowsum(dO * O), the softmax-Jacobian correction per query. A cotangent of
  # the log-sum-exp adds p * dlse to the logits' gradient, the same as lowering D by dlse.
  delta_BTH = jnp.einsum('bthd,bthd->bth', o_BTHD.astype(jnp.float32), do_BTHD.astype(jnp.float32))
  delta_BTH -= dlse_BHT.transpose(0, 2, 1)
  delta_BHT = jnp.pad(delta_BTH, ((0, 0), (0, lse_BHT.shape[2] - plan.q_len), (0, 0))).transpose(0, 2, 1)
  dq_BTHD, dk_BSKD, dv_BSKD = backward(
      _pad_seq(q_BTHD, plan.block_q), _pad_seq(k_BSKD, plan.block_k), _pad_seq(v_BSKD, plan.block_k),
      _pad_seq(do_BTHD, plan.block_q), lse_BHT, delta_BHT, plan, segments)
  seg_cts = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in seg)
  return dq_BTHD[:, :plan.q_len], dk_BSKD[:, :plan.kv_len], dv_BSKD[:, :plan.kv_len], seg_cts


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------
# Which blocks are visible, and the block math both bodies share.


class _Traced:
  """The block math on traced indices (inside a kernel)."""
  maximum, minimum, div = staticmethod(jnp.maximum), staticmethod(jnp.minimum), staticmethod(lax.div)


class _Static:
  """The same on Python ints, for grid sizes: no JAX op runs, so none lands on a context mesh's
  devices (compile-only ones when compiling for a target)."""
  maximum, minimum = staticmethod(max), staticmethod(min)
  div = staticmethod(lambda a, b: a // b)  # lax.div truncates; every operand here is >= 0


def _kv_blocks(i, plan: _Plan, ops=_Traced, first=None):
  """Key blocks [lo, hi) holding a key that some query of query block `i` keeps; `first`: the first key
  block its segments reach (traced, from `_Segments`)."""
  first_q = plan.offset + i * plan.block_q
  hi = plan.num_kv_blocks
  if plan.causal:  # stop at the diagonal: the keys at positions <= the block's last query
    last_q = first_q + plan.block_q - 1
    seen = ops.div(ops.maximum(last_q - plan.key_first + plan.key_stride, 0), plan.key_stride)
    hi = ops.minimum(hi, ops.div(seen + plan.block_k - 1, plan.block_k))
  lo = 0
  if plan.window is not None:  # start at the first block inside the window
    lo = ops.div(ops.maximum(first_q - plan.window + 1, 0), plan.block_k)
  if first is not None:
    lo = ops.maximum(lo, first)
  return lo, hi


def _q_blocks(j, plan: _Plan, ops=_Traced, end=None):
  """Query blocks [lo, hi) holding a query that keeps some key of key block `j`; `end`: one past the last
  query block its segments reach (traced, from `_Segments`)."""
  first_k = j * plan.block_k
  lo = 0
  if plan.causal:  # from the query at the block's first key position
    lo = ops.div(ops.maximum(first_k * plan.key_stride + plan.key_first - plan.offset, 0), plan.block_q)
  hi = plan.num_q_blocks
  if plan.window is not None:  # queries t with t + offset - window < last key of the block
    bound = ops.maximum(first_k + plan.block_k - 1 + plan.window - plan.offset, 0)
    hi = ops.minimum(hi, ops.div(bound + plan.block_q - 1, plan.block_q))
  if end is not None:
    hi = ops.minimum(hi, end)
  return lo, hi


def _max_span(blocks, n: int) -> int:
  """The most blocks any of `n` outer blocks visits, `blocks(i, ops)` on ints: a shrunk grid axis."""
  return max(1, max(hi - lo for lo, hi in (blocks(i, _Static) for i in range(n))))


def _clamped(lo, hi, step):
  """Block visited at `step` of a shrunk axis; steps past the span repeat the last visible block."""
  return lo + jnp.minimum(step, jnp.maximum(hi - lo - 1, 0))


def _nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(x, y, i, j, plan: _Plan, *, transposed: bool = False, qseg=None, kseg=None):
  """Scaled, masked logits of query block `i` and key block `j`: q k^T [Q, C], or k q^T [C, Q] when
  `transposed` (x, y are then k, q). `qseg` / `kseg`: the blocks' segment ids, shaped to broadcast
  against the logits (a column and a row)."""
  s = _nt(x, y) * plan.sm_scale
  q_axis, k_axis = (1, 0) if transposed else (0, 1)
  qpos = plan.offset + i * plan.block_q + lax.broadcasted_iota(jnp.int32, s.shape, q_axis)
  kidx = j * plan.block_k + lax.broadcasted_iota(jnp.int32, s.shape, k_axis)
  kpos = kidx * plan.key_stride + plan.key_first if plan.strided else kidx
  keep = _keep(qpos, kpos, causal=plan.causal, window=plan.window, qseg=qseg, kseg=kseg)
  if plan.kv_mask_len is not None:
    keep = kidx < plan.kv_mask_len if keep is None else keep & (kidx < plan.kv_mask_len)
  return s if keep is None else jnp.where(keep, s, MASK_VALUE)


def _normalise(acc_QD, m_QL, l_QL):
  """Output and log-sum-exp of the online softmax; a row that saw no key (its max is still the mask
  value, or -inf when no block was visited) gives zeros and lse +inf, so exp(s - lse) = 0 there."""
  seen_QL = m_QL > MASK_VALUE
  o_QD = jnp.where(_lanes(seen_QL, acc_QD.shape[1]), acc_QD / _lanes(l_QL, acc_QD.shape[1]), 0.0)
  return o_QD, jnp.where(seen_QL, m_QL + jnp.log(l_QL), jnp.inf)


def _lanes(x_QL, n: int):
  """Stretches per-row statistics to width `n`: [Q, 1] broadcasts as is; [Q, 128] (replicated over
  lanes on TPU) is sliced or tiled."""
  L = x_QL.shape[1]
  if L == 1 or L == n:
    return x_QL
  return x_QL[:, :n] if n < L else jnp.tile(x_QL, (1, n // L))


def _softmax_step(s_QC, v_CD, acc_QD, m_QL, l_QL):
  """One online-softmax update (FlashAttention-2 Alg. 1); m and l are [Q, 1] or [Q, 128]."""
  m_next = jnp.maximum(m_QL, s_QC.max(axis=1, keepdims=True))
  p_QC = jnp.exp(s_QC - _lanes(m_next, s_QC.shape[1]))
  alpha = jnp.exp(m_QL - m_next)
  l_next = alpha * l_QL + p_QC.sum(axis=1, keepdims=True)
  acc_QD = acc_QD * _lanes(alpha, acc_QD.shape[1]) + _nn(p_QC.astype(v_CD.dtype), v_CD)
  return acc_QD, m_next, l_next


def _dq_step(q_QD, k_CD, v_CD, do_QD, lse_Q1, delta_Q1, i, j, plan: _Plan, qseg=None, kseg=None):
  """Contribution of key block `j` to dq / sm_scale (FlashAttention-2 Alg. 2)."""
  p_QC = jnp.exp(_scores(q_QD, k_CD, i, j, plan, qseg=qseg, kseg=kseg) - lse_Q1)
  ds_QC = p_QC * (_nt(do_QD, v_CD) - delta_Q1)
  return _nn(ds_QC.astype(k_CD.dtype), k_CD)


def _dkv_step(q_QD, k_CD, v_CD, do_QD, lse_1Q, delta_1Q, i, j, plan: _Plan, qseg=None, kseg=None):
  """Contributions of query block `i` to dk / sm_scale and dv, computed key-major ([C, Q] tiles) so every
  product is a plain or right-transposed matmul."""
  p_CQ = jnp.exp(_scores(k_CD, q_QD, i, j, plan, transposed=True, qseg=qseg, kseg=kseg) - lse_1Q)
  dv_CD = _nn(p_CQ.astype(do_QD.dtype), do_QD)
  ds_CQ = p_CQ * (_nt(v_CD, do_QD) - delta_1Q)
  return _nn(ds_CQ.astype(q_QD.dtype), q_QD), dv_CD


# ----------------------------------------------------------------------------------------------------
# GPU body (Triton): [B, T, H, D] layout, key/query loops inside the kernel.


def _gpu_params(plan: _Plan):
  return plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)


def _gpu_segment_specs(plan: _Plan, T: int, S: int, segments: _Segments, *, key_major: bool = False):
  """BlockSpecs of the `_Segments` arrays for a (query block, batch, head) grid, or for the dk/dv kernel's
  (key block, batch, kv head) grid when `key_major`: the block's own ids, the other side's whole row, and
  the flat bounds whole."""
  if key_major:
    return [pl.BlockSpec((None, T), lambda j, b, k: (b, 0)),
            pl.BlockSpec((None, plan.block_k), lambda j, b, k: (b, j)),
            pl.BlockSpec(segments.end_q_block.shape, lambda j, b, k: (0,))]
  return [pl.BlockSpec((None, plan.block_q), lambda i, b, h: (b, i)),
          pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
          pl.BlockSpec(segments.first_kv_block.shape, lambda i, b, h: (0,))]


def _gpu_segment_args(segments: _Segments | None, key_major: bool = False) -> tuple:
  if segments is None:
    return ()
  bounds = segments.end_q_block if key_major else segments.first_kv_block
  return segments.q_BT, segments.k_BS, bounds


def _gpu_query_side(plan: _Plan, i, b, seg_refs):
  """(key blocks to visit, the query block's segment column, a key block's segment row) in a query-major
  GPU kernel; no segments: the plain causal/window range and no masks."""
  if seg_refs is None:
    return _kv_blocks(i, plan), None, lambda j: None
  qs_ref, ks_ref, first_ref = seg_refs
  first = first_ref[b * plan.num_q_blocks + i]
  return (_kv_blocks(i, plan, first=first), qs_ref[...][:, None],
          lambda j: ks_ref[pl.ds(j * plan.block_k, plan.block_k)][None, :])


def _gpu_fwd_kernel(*refs, plan: _Plan):
  q_ref, k_ref, v_ref = refs[:3]
  seg_refs, (o_ref, lse_ref) = (refs[3:6], refs[6:]) if plan.segmented else (None, refs[3:])
  i, b = pl.program_id(0), pl.program_id(1)
  q_QD = q_ref[...]
  blocks, qseg, kseg = _gpu_query_side(plan, i, b, seg_refs)

  def body(j, carry):
    kv = pl.ds(j * plan.block_k, plan.block_k)
    s_QC = _scores(q_QD, k_ref[kv, :], i, j, plan, qseg=qseg, kseg=kseg(j))
    return _softmax_step(s_QC, v_ref[kv, :], *carry)

  Q, D = q_QD.shape
  init = (jnp.zeros((Q, D), jnp.float32), jnp.full((Q, 1), -jnp.inf, jnp.float32),
          jnp.zeros((Q, 1), jnp.float32))
  o_QD, lse_Q1 = _normalise(*lax.fori_loop(*blocks, body, init))
  o_ref[...] = o_QD.astype(o_ref.dtype)
  lse_ref[...] = lse_Q1[:, 0]


def _gpu_forward(q_BTHD, k_BSKD, v_BSKD, plan: _Plan, segments: _Segments | None = None):
  B, T, H, D = q_BTHD.shape
  S, G, Q = k_BSKD.shape[1], plan.group, plan.block_q
  q_spec = pl.BlockSpec((None, Q, None, D), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0))
  seg_specs = _gpu_segment_specs(plan, T, S, segments) if segments is not None else []
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, plan=plan),
      grid=(T // Q, B, H),
      in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, Q), lambda i, b, h: (b, h, i))],
      out_shape=[out_struct(q_BTHD.shape, q_BTHD.dtype, q_BTHD, k_BSKD, v_BSKD),
                 out_struct((B, H, T), jnp.float32, q_BTHD, k_BSKD, v_BSKD)],
      compiler_params=_gpu_params(plan),
      interpret=interpret_param(plan.interpret, 'gpu'),
      name=f'{plan.kernel_name}_fwd',
  )(q_BTHD, k_BSKD, v_BSKD, *_gpu_segment_args(segments))


def _gpu_dq_kernel(*refs, plan: _Plan):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  seg_refs, (dq_ref,) = (refs[6:9], refs[9:]) if plan.segmented else (None, refs[6:])
  i, b = pl.program_id(0), pl.program_id(1)
  q_QD, do_QD = q_ref[...], do_ref[...]
  lse_Q1, delta_Q1 = lse_ref[...][:, None], delta_ref[...][:, None]
  blocks, qseg, kseg = _gpu_query_side(plan, i, b, seg_refs)

  def body(j, acc_QD):
    kv = pl.ds(j * plan.block_k, plan.block_k)
    return acc_QD + _dq_step(q_QD, k_ref[kv, :], v_ref[kv, :], do_QD, lse_Q1, delta_Q1, i, j, plan,
                             qseg=qseg, kseg=kseg(j))

  acc_QD = lax.fori_loop(*blocks, body, jnp.zeros(q_QD.shape, jnp.float32))
  dq_ref[...] = (acc_QD * plan.sm_scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(*refs, plan: _Plan):
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
  seg_refs, (dk_ref, dv_ref) = (refs[6:9], refs[9:]) if plan.segmented else (None, refs[6:])
  j, b = pl.program_id(0), pl.program_id(1)
  k_CD, v_CD = k_ref[...], v_ref[...]
  if seg_refs is None:
    (lo, hi), kseg, qseg = _q_blocks(j, plan), None, lambda i: None
  else:
    qs_ref, ks_ref, end_ref = seg_refs
    lo, hi = _q_blocks(j, plan, end=end_ref[b * plan.num_kv_blocks + j])
    kseg = ks_ref[...][:, None]
    qseg = lambda i: qs_ref[pl.ds(i * plan.block_q, plan.block_q)][None, :]  # noqa: E731

  def head(g, carry):  # the query heads of this kv group, summed here rather than per head in HBM
    def body(i, carry):
      rows = pl.ds(i * plan.block_q, plan.block_q)
      dk_CD, dv_CD = _dkv_step(q_ref[rows, g, :], k_CD, v_CD, do_ref[rows, g, :], lse_ref[g, rows][None, :],
                               delta_ref[g, rows][None, :], i, j, plan, qseg=qseg(i), kseg=kseg)
      return carry[0] + dk_CD, carry[1] + dv_CD

    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k_CD.shape, jnp.float32)
  dk_CD, dv_CD = lax.fori_loop(0, plan.group, head, (zeros, zeros))
  dk_ref[...] = (dk_CD * plan.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_CD.astype(dv_ref.dtype)


def _gpu_backward(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, plan: _Plan,
                  segments: _Segments | None = None):
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1:3]
  G, Q, C = plan.group, plan.block_q, plan.block_k
  interpret = interpret_param(plan.interpret, 'gpu')
  q_spec = pl.BlockSpec((None, Q, None, D), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0))
  row_spec = pl.BlockSpec((None, None, Q), lambda i, b, h: (b, h, i))
  segmented = segments is not None
  dq_BTHD = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, plan=plan),
      grid=(T // Q, B, H),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *(_gpu_segment_specs(plan, T, S, segments) if segmented else [])],
      out_specs=q_spec,
      out_shape=out_struct(q_BTHD.shape, q_BTHD.dtype, q_BTHD, k_BSKD, do_BTHD),
      compiler_params=_gpu_params(plan),
      interpret=interpret,
      name=f'{plan.kernel_name}_dq',
  )(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, *_gpu_segment_args(segments))

  # Grid over (key block, batch, kv head); the block of a kv head's G query heads is block `k` of size G.
  group_spec = pl.BlockSpec((None, T, G, D), lambda j, b, k: (b, 0, k, 0))
  group_rows_spec = pl.BlockSpec((None, G, T), lambda j, b, k: (b, k, 0))
  kv_block_spec = pl.BlockSpec((None, C, None, D), lambda j, b, k: (b, j, k, 0))
  dk_BSKD, dv_BSKD = pl.pallas_call(
      functools.partial(_gpu_dkv_kernel, plan=plan),
      grid=(S // C, B, K),
      in_specs=[group_spec, kv_block_spec, kv_block_spec, group_spec, group_rows_spec, group_rows_spec,
                *(_gpu_segment_specs(plan, T, S, segments, key_major=True) if segmented else [])],
      out_specs=[kv_block_spec, kv_block_spec],
      out_shape=[out_struct(k_BSKD.shape, k_BSKD.dtype, q_BTHD, k_BSKD, do_BTHD)] * 2,
      compiler_params=_gpu_params(plan),
      interpret=interpret,
      name=f'{plan.kernel_name}_dkv',
  )(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, *_gpu_segment_args(segments, key_major=True))
  return dq_BTHD, dk_BSKD, dv_BSKD


# ----------------------------------------------------------------------------------------------------
# TPU body (Mosaic): [B, H, T, D] layout, the key (or query) loop as the last, shrunk grid axes.


def _to_bhtd(x_BTHD):
  return x_BTHD.transpose(0, 2, 1, 3)


def _tpu_split(refs, plan: _Plan, n_in: int):
  """(bounds ref or None, inputs, segment refs or None, the rest) of a TPU kernel's refs: with segments the
  scalar-prefetched bounds come first and the two segment-id blocks follow the inputs."""
  if not plan.segmented:
    return None, refs[:n_in], None, refs[n_in:]
  return refs[0], refs[1:1 + n_in], refs[1 + n_in:3 + n_in], refs[3 + n_in:]


def _tpu_first(bounds_ref, b, i, plan: _Plan):
  return None if bounds_ref is None else bounds_ref[b * plan.num_q_blocks + i]


def _tpu_end(bounds_ref, b, j, plan: _Plan):
  return None if bounds_ref is None else bounds_ref[b * plan.num_kv_blocks + j]


def _tpu_fwd_kernel(*refs, plan: _Plan):
  bounds_ref, (q_ref, k_ref, v_ref), seg_refs, (o_ref, lse_ref, acc_ref, m_ref, l_ref) = _tpu_split(
      refs, plan, 3)
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = _kv_blocks(i, plan, first=_tpu_first(bounds_ref, b, i, plan))
  qseg, kseg = (None, None) if seg_refs is None else (seg_refs[0][...], seg_refs[1][...])

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when(lo + step < hi)
  def _compute():
    s_QC = _scores(q_ref[...], k_ref[...], i, lo + step, plan, qseg=qseg, kseg=kseg)
    acc_ref[...], m_ref[...], l_ref[...] = _softmax_step(s_QC, v_ref[...], acc_ref[...], m_ref[...],
                                                         l_ref[...])

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    o_QD, lse_QL = _normalise(acc_ref[...], m_ref[...], l_ref[...])
    o_ref[...] = o_QD.astype(o_ref.dtype)
    lse_ref[...] = lse_QL.T[:1]  # a lane-dense row: a [Q, 128] block would store each value 128 times


def _tpu_kv_block(plan: _Plan):
  """The clamped key block of a (batch, head, query block, step) grid step: skipped steps re-use the
  block already in VMEM. With segments the bounds ref (scalar-prefetched) comes last."""
  def block(b, i, step, *bounds):
    first = _tpu_first(bounds[0], b, i, plan) if bounds else None
    return _clamped(*_kv_blocks(i, plan, first=first), step)
  return block


def _tpu_kv_map(plan: _Plan):
  """Index map of K/V blocks for a (batch, head, query block, step) grid: kv head h // G, and the
  clamped key block."""
  def index_map(b, h, i, step, *bounds):  # lax.div: Mosaic cannot lower the sign test inside `//`
    return b, lax.div(h, plan.group), _tpu_kv_block(plan)(b, i, step, *bounds), 0
  return index_map


def _tpu_query_major_segments(plan: _Plan, segments: _Segments | None):
  """(extra in_specs, extra args, scalar-prefetch args) of a query-major TPU kernel: the query block's ids
  as a column [Q, 1], the visited key block's as a row [1, C]."""
  if segments is None:
    return [], (), ()
  Q, C = plan.block_q, plan.block_k
  specs = [pl.BlockSpec((None, Q, 1), lambda b, h, i, step, bounds: (b, i, 0)),
           pl.BlockSpec((None, 1, C), lambda b, h, i, step, bounds: (b, 0, _tpu_kv_block(plan)(b, i, step,
                                                                                             bounds)))]
  return specs, (segments.q_BT[:, :, None], segments.k_BS[:, None, :]), (segments.first_kv_block,)


def _tpu_forward(q_BTHD, k_BSKD, v_BSKD, plan: _Plan, segments: _Segments | None = None):
  B, T, H, D = q_BTHD.shape
  Q, C = plan.block_q, plan.block_k
  seg_specs, seg_args, prefetch = _tpu_query_major_segments(plan, segments)
  q_spec = pl.BlockSpec((None, None, Q, D), lambda b, h, i, step, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, C, D), _tpu_kv_map(plan))
  o_BHTD, lse_BH1T = pl.pallas_call(
      functools.partial(_tpu_fwd_kernel, plan=plan),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(B, H, T // Q, _max_span(lambda i, ops: _kv_blocks(i, plan, ops), T // Q)),
          in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
          out_specs=[q_spec, pl.BlockSpec((None, None, 1, Q), lambda b, h, i, step, *_: (b, h, 0, i))],
          scratch_shapes=[pltpu.VMEM((Q, D), jnp.float32), pltpu.VMEM((Q, _LANES), jnp.float32),
                          pltpu.VMEM((Q, _LANES), jnp.float32)]),
      out_shape=[out_struct((B, H, T, D), q_BTHD.dtype, q_BTHD, k_BSKD, v_BSKD),
                 out_struct((B, H, 1, T), jnp.float32, q_BTHD, k_BSKD, v_BSKD)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret_param(plan.interpret, 'tpu'),
      name=f'{plan.kernel_name}_fwd',
  )(*prefetch, _to_bhtd(q_BTHD), _to_bhtd(k_BSKD), _to_bhtd(v_BSKD), *seg_args)
  return _to_bhtd(o_BHTD), lse_BH1T[:, :, 0]


def _tpu_dq_kernel(*refs, plan: _Plan):
  bounds_ref, inputs, seg_refs, (dq_ref, acc_ref) = _tpu_split(refs, plan, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  b, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  lo, hi = _kv_blocks(i, plan, first=_tpu_first(bounds_ref, b, i, plan))
  qseg, kseg = (None, None) if seg_refs is None else (seg_refs[0][...], seg_refs[1][...])

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(lo + step < hi)
  def _compute():
    acc_ref[...] += _dq_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[0][:, None],
                             delta_ref[0][:, None], i, lo + step, plan, qseg=qseg, kseg=kseg)

  @pl.when(step == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * plan.sm_scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(*refs, plan: _Plan):
  bounds_ref, inputs, seg_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = _tpu_split(refs, plan, 6)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
  b, j, g, step = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, hi = _q_blocks(j, plan, end=_tpu_end(bounds_ref, b, j, plan))
  kseg, qseg = (None, None) if seg_refs is None else (seg_refs[0][...], seg_refs[1][...])

  @pl.when((g == 0) & (step == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  @pl.when(lo + step < hi)
  def _compute():
    dk_CD, dv_CD = _dkv_step(q_ref[...], k_ref[...], v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
                             lo + step, j, plan, qseg=qseg, kseg=kseg)
    dk_acc[...] += dk_CD
    dv_acc[...] += dv_CD

  @pl.when((g == plan.group - 1) & (step == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * plan.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _tpu_backward(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT, plan: _Plan,
                  segments: _Segments | None = None):
  B, T, H, D = q_BTHD.shape
  S, K = k_BSKD.shape[1:3]
  G, Q, C = plan.group, plan.block_q, plan.block_k
  interpret = interpret_param(plan.interpret, 'tpu')
  q_BHTD, k_BKSD, v_BKSD, do_BHTD = map(_to_bhtd, (q_BTHD, k_BSKD, v_BSKD, do_BTHD))
  # Per-query rows as [B, H, 1, T]: a (1, Q) block is legal on TPU and reads as a row for the key-major
  # dk/dv tiles.
  lse_BH1T, delta_BH1T = lse_BHT[:, :, None], delta_BHT[:, :, None]

  seg_specs, seg_args, prefetch = _tpu_query_major_segments(plan, segments)
  q_spec = pl.BlockSpec((None, None, Q, D), lambda b, h, i, step, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, C, D), _tpu_kv_map(plan))
  row_spec = pl.BlockSpec((None, None, 1, Q), lambda b, h, i, step, *_: (b, h, 0, i))
  dq_BHTD = pl.pallas_call(
      functools.partial(_tpu_dq_kernel, plan=plan),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(B, H, T // Q, _max_span(lambda i, ops: _kv_blocks(i, plan, ops), T // Q)),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((Q, D), jnp.float32)]),
      out_shape=out_struct(q_BHTD.shape, q_BHTD.dtype, q_BHTD, k_BKSD, do_BHTD),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=interpret,
      name=f'{plan.kernel_name}_dq',
  )(*prefetch, q_BHTD, k_BKSD, v_BKSD, do_BHTD, lse_BH1T, delta_BH1T, *seg_args)

  # Grid (batch, kv head, key block, query head in group, step); the query block is clamped like the
  # key block of the forward pass.
  def q_block(b, j, step, *bounds):
    end = _tpu_end(bounds[0], b, j, plan) if bounds else None
    return _clamped(*_q_blocks(j, plan, end=end), step)

  group_spec = pl.BlockSpec((None, None, Q, D),
                            lambda b, k, j, g, step, *bd: (b, k * G + g, q_block(b, j, step, *bd), 0))
  group_row_spec = pl.BlockSpec((None, None, 1, Q),
                                lambda b, k, j, g, step, *bd: (b, k * G + g, 0, q_block(b, j, step, *bd)))
  kv_block_spec = pl.BlockSpec((None, None, C, D), lambda b, k, j, g, step, *_: (b, k, j, 0))
  if segments is None:
    seg_specs, seg_args, prefetch = [], (), ()
  else:  # key-major: the key block's ids as a column [C, 1], the visited query block's as a row [1, Q]
    seg_specs = [pl.BlockSpec((None, C, 1), lambda b, k, j, g, step, bd: (b, j, 0)),
                 pl.BlockSpec((None, 1, Q), lambda b, k, j, g, step, bd: (b, 0, q_block(b, j, step, bd)))]
    seg_args, prefetch = (segments.k_BS[:, :, None], segments.q_BT[:, None, :]), (segments.end_q_block,)
  dk_BKSD, dv_BKSD = pl.pallas_call(
      functools.partial(_tpu_dkv_kernel, plan=plan),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(B, K, S // C, G, _max_span(lambda j, ops: _q_blocks(j, plan, ops), S // C)),
          in_specs=[group_spec, kv_block_spec, kv_block_spec, group_spec, group_row_spec, group_row_spec,
                    *seg_specs],
          out_specs=[kv_block_spec, kv_block_spec],
          scratch_shapes=[pltpu.VMEM((C, D), jnp.float32), pltpu.VMEM((C, D), jnp.float32)]),
      out_shape=[out_struct(k_BKSD.shape, k_BKSD.dtype, q_BHTD, k_BKSD, do_BHTD)] * 2,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary')),
      interpret=interpret,
      name=f'{plan.kernel_name}_dkv',
  )(*prefetch, q_BHTD, k_BKSD, v_BKSD, do_BHTD, lse_BH1T, delta_BH1T, *seg_args)
  return _to_bhtd(dq_BHTD), _to_bhtd(dk_BKSD), _to_bhtd(dv_BKSD)


_BODIES = {'gpu': (_gpu_forward, _gpu_backward), 'tpu': (_tpu_forward, _tpu_backward)}
