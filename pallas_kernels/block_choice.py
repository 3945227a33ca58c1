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

Shape letters as in `sparse_lm/__init__.py`; N the blocks a query may choose among, n chosen per query.
"""

import jax
import jax.numpy as jnp


def forced_blocks(pos_BT: jax.Array, num_blocks: int, *, block_size: int, force_first: bool,
                  force_local: int) -> jax.Array:
  """`[B, T, N]`: the blocks each query keeps whatever their scores (only valid ones)."""
  j_11N = jnp.arange(num_blocks)[None, None, :]
  valid_BTN = j_11N * block_size <= pos_BT[:, :, None]
  own_BT1 = (pos_BT // block_size)[:, :, None]
  forced_BTN = (j_11N <= own_BT1) & (j_11N > own_BT1 - force_local)
  if force_first:
    forced_BTN |= j_11N == 0
  return valid_BTN & forced_BTN


def select_blocks(score_BTKN: jax.Array, pos_BT: jax.Array, *, num_selected: int, block_size: int,
                  force_first: bool = True, force_local: int = 2) -> jax.Array:
  """The top `num_selected` blocks per query and kv head, `[B, T, K, min(num_selected, N)]` int32."""
  N = score_BTKN.shape[-1]
  valid_BTN = jnp.arange(N)[None, None, :] * block_size <= pos_BT[:, :, None]
  forced_BTN = forced_blocks(pos_BT, N, block_size=block_size, force_first=force_first,
                             force_local=force_local)
  score_BTKN = jnp.where(valid_BTN[:, :, None, :], jax.lax.stop_gradient(score_BTKN), -jnp.inf)
  score_BTKN = jnp.where(forced_BTN[:, :, None, :], jnp.inf, score_BTKN)
  top_BTKn, idx_BTKn = jax.lax.top_k(score_BTKN, min(num_selected, N))
  return jnp.where(top_BTKn == -jnp.inf, -1, idx_BTKn).astype(jnp.int32)
