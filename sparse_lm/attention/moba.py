"""Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189).

The keys are cut into blocks of `moba.block_size`. A query's gate score for a block is its dot product
with the block's mean key (no parameters); the query attends, with one softmax, to the keys of its top
`moba.top_k` blocks, its own block always among them (causal inside it). As in the paper, the own block
counts toward `top_k` and is chosen whatever its score, and a block that starts after the query (not yet
begun) is never chosen; every other candidate lies wholly before the query, so its mean key is of keys
the query may see. Projections and RoPE are dense attention's; the gate scores rotated queries against
means of rotated keys.

Where this departs from the paper, and why: the paper gates per query head. Here the heads of a kv group
share one choice, their scores summed (as NSA's Eq. 10 does), so that `pallas_kernels.selected_attention`
serves both paths: its group-centric kernel loads each chosen K/V block once for the group. Per-head
choice would need G = H / K times the block lists and either K/V repeated per query head (G times the
K/V reads) or a kernel keyed by query head; with one kv head per query head (`num_kv_heads = num_heads`)
the two are the same. The paper's layer-wise hybrid (the last few layers full attention, which it
reports closes most of the gap in supervised fine-tuning): `moba.dense_last_layers` blocks at the top
of the model run dense attention (`at_layer`).

Documents in a packed row (`seg_BT`): a query chooses only among the blocks of its own document (from
the document's first block, `block_choice.first_block`), so `selected_attention`, which attends exactly
the listed blocks, needs no segment mask. How blocks meet document boundaries, and why: the packer starts
each document on the block grid (`document_alignment`), so a document's blocks, their mean keys and the
gate's choice are exactly those it has alone. Masking partial blocks instead would change a document's
block means with where it lands in the row (and leave the tokens of its first partial block without an
own block); per-document block grids would need a kernel that takes per-document block offsets. The
cost of aligning is padding, at most `block_size - 1` tokens a document: on the embedded corpus 1.7% of
a row at the paper's 512 and 0.2% at 64 (`python benchmarks/packing.py`, BENCHMARKS.md), but far more
on short web documents (a corpus of 300-token documents pads 41% at 512); per-document offsets are the
way out for such data and are not built.

Context parallelism (`mesh.context`, `attend_split`): every device gathers the keys and values whole (a
query may choose any begun block), takes the block means from them, and chooses and attends for its own
queries at their places in the row. Gathering only the block means and then the chosen blocks is the
step after.

Memory is linear in T: the block means are `[B, T / block_size, K, D]` and the gate scores are taken
`XLA_CHUNK` queries at a time (`map_query_chunks`), then only the `[B, T, K, top_k]` indices are kept.
The gate's FLOPs are T x (T / block_size) dot products a head, a 1 / block_size share of dense
attention's score products, forward only.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from pallas_kernels._reference import XLA_CHUNK, map_query_chunks
from pallas_kernels.block_choice import first_block, select_blocks
from pallas_kernels.selected_attention import selected_attention, selected_attention_reference
from sparse_lm import context, sharding
from sparse_lm.attention import dense, kv_cache
from sparse_lm.errors import ConfigError, require_positive


class Attention(dense.Attention):
  """MoBA over dense attention's grouped-query projections; `model.moba` holds the block size and k."""

  context_parallel = True
  segments = True

  @classmethod
  def document_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    return cfg.moba.block_size

  @staticmethod
  def defaults() -> dict:
    m = ml_collections.ConfigDict()
    # The paper's are 512 and 3 at 8K tokens (its scaling-law runs); these do sparse work on the default
    # config's 256 tokens (4 blocks, 3 chosen).
    m.block_size = 64  # keys per block
    m.top_k = 3  # blocks a query attends to, its own included
    m.dense_last_layers = 0  # the hybrid: this many top blocks run dense attention
    return {'moba': m}

  @staticmethod
  def tiny_config() -> dict:
    return {'moba': {'block_size': 4, 'top_k': 2}}

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    require_positive(cfg.moba, 'model.moba', ('block_size', 'top_k'))
    last = cfg.moba.dense_last_layers
    if not isinstance(last, int) or not 0 <= last <= cfg.num_layers:
      raise ConfigError(f'model.moba.dense_last_layers={last!r} must be an integer in 0..model.num_layers='
                        f'{cfg.num_layers}')

  @classmethod
  def at_layer(cls, cfg: ml_collections.ConfigDict, layer: int) -> type[dense.Attention]:
    return dense.Attention if layer >= cfg.num_layers - cfg.moba.dense_last_layers else cls

  @staticmethod
  def attended_keys(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """The own block's keys up to the query, the other chosen blocks whole, and the gate: one dot
    product with each begun block's mean key, 2 D FLOPs forward only, a sixth of a key's 3 x 4 D."""
    m, total = cfg.moba, 0.0
    for t in range(seq_len):
      begun = t // m.block_size + 1
      total += t % m.block_size + 1 + (min(m.top_k, begun) - 1) * m.block_size + begun / 6
    return total / seq_len

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.block_size, self.top_k = cfg.moba.block_size, cfg.moba.top_k

  def _block_means(self, k_BSKD) -> jax.Array:
    """`[B, N, K, D]` float32 mean keys of the blocks (a last partial block padded with zeros)."""
    B, S, K, D = k_BSKD.shape
    N = -(-S // self.block_size)
    # Averaged with K and D as one minor axis: a TPU lays `[.., K, D]` with K < 8 out padded (decoding
    # from a 64K cache, v5p, planned 4.0 GiB of temporaries so against 0.2 GiB this way).
    k_BNLX = jnp.pad(k_BSKD, ((0, 0), (0, N * self.block_size - S), (0, 0), (0, 0))).reshape(
        B, N, self.block_size, K * D)
    return jnp.mean(k_BNLX, axis=2, dtype=jnp.float32).reshape(B, N, K, D)

  def _choose(self, q_BTHD, mean_BNKD, qpos_BT, seg_BT=None, first_BT=None) -> jax.Array:
    """`[B, T, K, top_k]` blocks per query and kv group from the blocks' mean keys: the gate scores,
    summed over the group's heads; under `seg_BT`, only blocks of the query's own document (or from
    `first_BT`, each query's document's first block, where the queries are not the row's 0..T-1)."""
    H, D = q_BTHD.shape[2:]
    K = mean_BNKD.shape[2]
    if first_BT is None:
      first_BT = (jnp.zeros_like(qpos_BT) if seg_BT is None else first_block(seg_BT, self.block_size))

    def one_chunk(q_BQHD, pos_BQ, first_BQ):
      q_BQKGD = q_BQHD.reshape(*q_BQHD.shape[:2], K, H // K, D).astype(jnp.float32)
      score_BQKN = jnp.einsum('bqkgd,bnkd->bqkn', q_BQKGD, mean_BNKD)
      return select_blocks(score_BQKN, pos_BQ, num_selected=self.top_k, block_size=self.block_size,
                           force_first=False, force_local=1, first_BT=first_BQ)
    # Padded queries sit at position -1 and choose nothing. The choice is discrete (select_blocks stops
    # the scores' gradient): the gate learns nothing, as in the paper.
    return map_query_chunks(one_chunk, (q_BTHD, qpos_BT, first_BT), (0, -1, 0), chunk=XLA_CHUNK)

  def attend(self, q_BTHD, k_BTKD, v_BTKD, seg_BT=None) -> jax.Array:
    B, T = q_BTHD.shape[:2]
    idx_BTKn = self._choose(q_BTHD, self._block_means(k_BTKD), jnp.broadcast_to(jnp.arange(T), (B, T)),
                            seg_BT)
    attend = functools.partial(selected_attention, block_size=self.block_size, implementation=self.kernel)
    return sharding.attention_per_device(attend, q_BTHD, k_BTKD, v_BTKD, idx_BTKn)

  def attend_split(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, seg_BT=None) -> jax.Array:
    """Under `mesh.context` (sparse_lm/context.py): the gate may choose any begun block, so every device
    gathers the keys and values whole (all-gathers over the axis, transient, a layer at a time), takes
    the block means from them and chooses and attends for its own queries at their places in the row.
    The chosen blocks are attended with `selected_attention`'s XLA reference (its kernels place the
    queries at 0..T-1)."""
    del pos_BT  # the rows' own positions decide; RoPE is in the keys already
    C = context.size()

    def share(q_BLHD, k_BLKD, v_BLKD, *seg):
      B, L = q_BLHD.shape[:2]
      rows_L = context.natural_rows(C, L // 2)
      rows_BL = jnp.broadcast_to(rows_L, (B, L))
      k_BTKD, v_BTKD = context.gather_sequence(k_BLKD, C), context.gather_sequence(v_BLKD, C)
      first_BL = first_block(context.gather_sequence(seg[0], C), self.block_size)[:, rows_L] if seg else None
      idx_BLKn = self._choose(q_BLHD, self._block_means(k_BTKD), rows_BL, first_BT=first_BL)
      return selected_attention_reference(q_BLHD, k_BTKD, v_BTKD, idx_BLKn, block_size=self.block_size,
                                          qpos_BT=rows_BL)
    args = (q_BTHD, k_BTKD, v_BTKD) + (() if seg_BT is None else (seg_BT,))
    return sharding.attention_per_device(share, *args, split_length=True,
                                         out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype))

  # ----------------------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int) -> dense.Cache:
    """Dense attention's rows and, per block, the float32 sum of its keys: the gate reads the
    `max_len / block_size` block means, not the keys (a 512th of them at the paper's block size)."""
    K, D = self.wk.shape[1:]
    return {**super().init_cache(batch, max_len),
            'ksum': jnp.zeros((batch, -(-max_len // self.block_size), K, D), jnp.float32)}

  def _written(self, cache: dense.Cache, k_BTKD, v_BTKD, pos_BT) -> dense.Cache:
    cache = super()._written(cache, k_BTKD, v_BTKD, pos_BT)
    k_BTKD = k_BTKD.astype(jnp.float32)
    if k_BTKD.shape[1] == 1:  # one row of sums, read, added to and written in place
      block = pos_BT[0, 0] // self.block_size
      row_B1KD = jax.lax.dynamic_slice_in_dim(cache['ksum'], block, 1, 1) + k_BTKD
      return {**cache, 'ksum': jax.lax.dynamic_update_slice_in_dim(cache['ksum'], row_B1KD, block, 1)}
    return {**cache, 'ksum': cache['ksum'].at[:, pos_BT[0] // self.block_size].add(k_BTKD)}

  def attend_from_cache(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, cache: dense.Cache):
    """Written first, then read: the gate reads the block sums and the attention gathers the chosen
    blocks, small reads that need no ordering to keep the update in place."""
    cache = self._written(cache, k_BTKD, v_BTKD, pos_BT)
    # Blocks of slots not yet written start after every query: never chosen, so their zeros are unread.
    idx_BTKn = self._choose(q_BTHD, cache['ksum'] / self.block_size, pos_BT)
    if pos_BT.shape[1] == 1:  # the chosen blocks, gathered as slices of the cache
      return kv_cache.attend_blocks(q_BTHD, cache['k'], cache['v'], idx_BTKn, block_size=self.block_size,
                                    pos_BT=pos_BT), cache
    return selected_attention_reference(q_BTHD, cache['k'], cache['v'], idx_BTKn, block_size=self.block_size,
                                        qpos_BT=pos_BT), cache
