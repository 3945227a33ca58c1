"""Compressed attention, the first branch of Native Sparse Attention (Yuan et al. 2025, arXiv:2502.11089,
Eqs. 7-8), in memory linear in the sequence.

Compressed key and value `i` summarise the tokens `[i*d, i*d + l)` (`l = cmp_block`, `d = cmp_stride`;
the caller computes them with NSA's phi) and sit at the block's last token, `i*d + l - 1`: query `t` sees
block `i` once that position is `<= t`. A query that sees no block (`t < l - 1`) outputs zeros and gets
zero gradients. Besides the output, the branch returns the float32 log-sum-exp of each query's logits,
`lse_BHT` (-inf where nothing is visible): with it, `block_selection` recomputes the probabilities of
Eq. 8 tile by tile to score the selection blocks, so the `[T, T / d]` probability matrix is never held.

Kernel: this is causal softmax attention with keys at positions `d*i + l - 1` instead of `i`, so it runs
`flash_attention`'s forward and backward bodies (GPU Triton, TPU Mosaic) with `key_positions=(d, l-1)`:
online softmax over compressed blocks, the key loop stopped at the last visible block, dq and dk/dv
recomputed from the log-sum-exp (whose own cotangent is taken too, so `lse` is differentiable).
Temporary memory per query block is O(block_q * D); nothing grows with `T * C`.

XLA reference: `compressed_attention_reference` holds the `[Q, C]` scores of one chunk of queries at a
time (`map_query_chunks`), so the `model.kernel=xla` path and decoding (queries at arbitrary positions)
stay linear in memory too.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._common import check_implementation
from pallas_kernels._reference import XLA_CHUNK
from pallas_kernels.flash_attention import (
  GPU_NUM_STAGES,
  GPU_NUM_WARPS,
  attention_with_lse_reference,
  flash_attention_with_lse,
)


def block_ends(num_blocks: int, *, cmp_block: int, cmp_stride: int) -> jax.Array:
  """Position of the last token of each compressed block: where the block becomes visible."""
  return jnp.arange(num_blocks) * cmp_stride + cmp_block - 1


def block_segments(seg_BT: jax.Array, num_blocks: int, *, cmp_stride: int) -> tuple[jax.Array, jax.Array]:
  """Segment ids of the queries and of the compressed blocks, the segment of each block's first token: a
  visible block (its last token at or before the query) whose first token is in the query's segment lies
  wholly inside the query's document."""
  return seg_BT, seg_BT[:, :num_blocks * cmp_stride:cmp_stride]


def compressed_attention_reference(q_BTHD: jax.Array, ck_BCKD: jax.Array, cv_BCKD: jax.Array, *,
                                   cmp_block: int, cmp_stride: int, sm_scale: float | None = None,
                                   pos_BT: jax.Array | None = None, segment_ids: jax.Array | None = None,
                                   chunk: int = XLA_CHUNK) -> tuple[jax.Array, jax.Array]:
  """Eq. 8 over the visible compressed blocks: output `[B, T, H, D]` and lse `[B, H, T]`, `chunk`
  queries at a time. `pos_BT` are the queries' positions (default `0..T-1`; decoding asks at others);
  `segment_ids` `[B, T]` (queries at `0..T-1`) keep each query to the blocks inside its segment."""
  segments = None if segment_ids is None else block_segments(segment_ids, ck_BCKD.shape[1],
                                                              cmp_stride=cmp_stride)
  return attention_with_lse_reference(q_BTHD, ck_BCKD, cv_BCKD, causal=True,
                                      key_positions=(cmp_stride, cmp_block - 1), sm_scale=sm_scale,
                                      qpos_BT=pos_BT, segment_ids=segments, chunk=chunk)


def compressed_attention(q_BTHD: jax.Array, ck_BCKD: jax.Array, cv_BCKD: jax.Array, *, cmp_block: int,
                         cmp_stride: int, sm_scale: float | None = None, block_q: int | None = None,
                         block_k: int | None = None, implementation: str = 'pallas',
                         interpret: bool | None = None, backend: str | None = None,
                         num_warps: int = GPU_NUM_WARPS,
                         num_stages: int = GPU_NUM_STAGES,
                         segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Queries `[B, T, H, D]` at positions `0..T-1` over compressed keys and values `[B, C, K, D]`:
  the output `[B, T, H, D]` and float32 lse `[B, H, T]`, both differentiable. Blocks, warps, stages,
  `backend` and `interpret` as for `flash_attention`; `implementation='xla'` is the chunked reference.
  `segment_ids` `[B, T]`: a query sees only blocks that lie inside its segment (`block_segments`); the
  kernels skip the key tiles before its segment's first block."""
  check_implementation(implementation)
  if not (isinstance(cmp_block, int) and isinstance(cmp_stride, int) and 1 <= cmp_stride <= cmp_block):
    raise ValueError(f'cmp_block={cmp_block}, cmp_stride={cmp_stride}: need integers 1 <= stride <= block')
  if not ck_BCKD.shape[1]:  # shorter than one block: nothing is visible anywhere
    B, T, H, _ = q_BTHD.shape
    return jnp.zeros_like(q_BTHD), jnp.full((B, H, T), -jnp.inf, jnp.float32)
  if implementation == 'xla':
    return compressed_attention_reference(q_BTHD, ck_BCKD, cv_BCKD, cmp_block=cmp_block,
                                          cmp_stride=cmp_stride, sm_scale=sm_scale, segment_ids=segment_ids)
  segments = None if segment_ids is None else block_segments(segment_ids, ck_BCKD.shape[1],
                                                              cmp_stride=cmp_stride)
  return flash_attention_with_lse(
      q_BTHD, ck_BCKD, cv_BCKD, causal=True, key_positions=(cmp_stride, cmp_block - 1), sm_scale=sm_scale,
      block_q=block_q, block_k=block_k, interpret=interpret, backend=backend, num_warps=num_warps,
      num_stages=num_stages, segment_ids=segments)
