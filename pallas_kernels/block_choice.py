"""Top-n block choice with forced blocks, written once for every block-sparse attention: NSA's Eq. 11
(Yuan et al. 2025; `block_selection` computes it fused, its reference calls this), and the gates of
other block-sparse variants (MoBA's top-k of blocks, the block granularity of DSA's indexer), which
score the blocks their own way and choose here.

Block `j` covers key positions `[j * block_size, (j + 1) * block_size)`. A query at position `t` may
choose a block starting at or before `t` (`j * block_size <= t`); `force_first` always keeps block 0 and
`force_local=m` the query's own block `t // block_size` and the `m - 1` before it (NSA: the first and two
local blocks, Sec. 4.1; MoBA: its own block only). The rest are ranked by score, ties to the lower
index; slots past the query's valid blocks are -1. The output is in `jax.lax.top_k`'s order: forced
blocks first, then by descending score. The choice is discrete: the scores are `stop_gradient`ed.

Documents. With `first_BT` (a packed row: the first block wholly inside each query's document,
`first_block`), blocks before it are not choosable and `force_first` keeps it instead of block 0: a
document that starts on the block grid chooses among its own blocks exactly as it does alone.

Shape letters as in `sparse_lm/__init__.py`; N the blocks a query may choose among, n chosen per query.
"""

import jax
import jax.numpy as jnp
from jax import lax


def segment_starts(seg_BT: jax.Array) -> jax.Array:
  """`[B, T]`: the position where each token's segment (a run of equal ids) starts."""
  B, T = seg_BT.shape
  change_BT = jnp.concatenate([jnp.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  return lax.cummax(jnp.where(change_BT, jnp.arange(T, dtype=jnp.int32), 0), axis=1)


def segment_ends(seg_BT: jax.Array) -> jax.Array:
  """`[B, T]`: the last position of each token's segment."""
  T = seg_BT.shape[1]
  return T - 1 - segment_starts(seg_BT[:, ::-1])[:, ::-1]


def first_block(seg_BT: jax.Array, block_size: int) -> jax.Array:
  """`[B, T]`: the first block wholly inside each token's segment (its start rounded up to the grid)."""
  return -(-segment_starts(seg_BT) // block_size)


def _choosable(pos_BT, num_blocks: int, block_size: int, first_BT):
  j_11N = jnp.arange(num_blocks)[None, None, :]
  valid_BTN = j_11N * block_size <= pos_BT[:, :, None]
  if first_BT is not None:
    valid_BTN &= j_11N >= first_BT[:, :, None]
  return j_11N, valid_BTN


def forced_blocks(pos_BT: jax.Array, num_blocks: int, *, block_size: int, force_first: bool,
                  force_local: int, first_BT: jax.Array | None = None) -> jax.Array:
  """`[B, T, N]`: the blocks each query keeps whatever their scores (only valid ones)."""
  j_11N, valid_BTN = _choosable(pos_BT, num_blocks, block_size, first_BT)
  own_BT1 = (pos_BT // block_size)[:, :, None]
  forced_BTN = (j_11N <= own_BT1) & (j_11N > own_BT1 - force_local)
  if force_first:
    forced_BTN |= j_11N == (0 if first_BT is None else first_BT[:, :, None])
  return valid_BTN & forced_BTN


def select_blocks(score_BTKN: jax.Array, pos_BT: jax.Array, *, num_selected: int, block_size: int,
                  force_first: bool = True, force_local: int = 2,
                  first_BT: jax.Array | None = None) -> jax.Array:
  """The top `num_selected` blocks per query and kv head, `[B, T, K, min(num_selected, N)]` int32."""
  N = score_BTKN.shape[-1]
  _, valid_BTN = _choosable(pos_BT, N, block_size, first_BT)
  forced_BTN = forced_blocks(pos_BT, N, block_size=block_size, force_first=force_first,
                             force_local=force_local, first_BT=first_BT)
  score_BTKN = jnp.where(valid_BTN[:, :, None, :], jax.lax.stop_gradient(score_BTKN), -jnp.inf)
  score_BTKN = jnp.where(forced_BTN[:, :, None, :], jnp.inf, score_BTKN)
  top_BTKn, idx_BTKn = jax.lax.top_k(score_BTKN, min(num_selected, N))
  return jnp.where(top_BTKn == -jnp.inf, -1, idx_BTKn).astype(jnp.int32)
