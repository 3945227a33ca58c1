"""DeepSeek Sparse Attention (DeepSeek-AI 2025, "DeepSeek-V3.2: Pushing the Frontier of Open Large Language
Models", Sec. 2.1): a lightning indexer scores every earlier token cheaply, and each query attends to its
top `dsa.top_k` tokens with dense attention's grouped-query projections.

The indexer (Eq. 1): `dsa.index_heads` small query heads of `dsa.index_head_dim` features, per-head
weights from the token, and keys of one shared head; `I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])`
over `s <= t`. Letters of this file: I the indexer's heads (their features D, like any head's).

- **Selection is shared by all heads**: the paper's indexer serves MLA in its MQA mode, one key/value
  head for all query heads; here one indexer per layer chooses for every kv group, and its `[B, T, 1, n]`
  lists go to the kernels as one list per token for all groups (token attention builds one inverse map
  from them; copied per group they were K x 1 GiB arrays a layer at the 100m rung's top-2,048 on 8,192
  tokens, BENCHMARKS.md). Per-group indexers would be K times the indexer for a choice the paper does
  not make. While `t < top_k` a query sees all its tokens.
- **Training** (Sec. 2.1.1): the indexer learns only from a KL loss toward the main attention's
  distribution, summed over heads and L1-normalised (here: the mean of the heads' softmaxes, the same
  thing), detached; its input is detached, so the language-model loss never reaches it and the KL
  reaches nothing else. Dense warm-up (`dsa.dense_warmup_steps` > 0): dense attention while the KL is
  taken over all earlier tokens; then sparse, the KL taken over the selected tokens only. The paper
  warms up from a trained dense checkpoint with the rest of the model frozen; training from scratch,
  this trains the whole model during the warm-up. The step count is the layer's `WarmupClock` (model
  state, checkpointed, so a resumed run stays in the stage it was in); it counts the steps applied, so
  a step skipped as non-finite does not count. With no warm-up the model is sparse from step 0.
- **The index front end** follows DeepSeek's public inference code (deepseek-ai/DeepSeek-V3.2-Exp,
  `inference/model.py`, class `Indexer`): the index key goes through a LayerNorm (`k_norm`, gain and
  bias; `dsa.key_norm`), RoPE rotates only the first `qk_rope_head_dim` = 64 index features of queries
  and keys (`dsa.index_rope_dim`), the rest unrotated, and in the non-interleaved (half-split) layout:
  the repository's 2025-11-17 update corrected an earlier version of that file that rotated the
  indexer's features interleaved ("rope in indexer is not interleaved"), which is the layout this
  file's `rope` uses. The scaling constants are that file's: the weights times `n_heads ** -0.5` and
  the scores times `head_dim ** -0.5` (`softmax_scale`), here applied inside the ReLU, which a positive
  factor passes through unchanged; the top-k is over `relu(q . k)` summed with those weights, as
  `fp8_index` computes. Not followed: the reference quantises queries and keys to FP8 with per-block
  scales after a Hadamard rotation (`rotate_activation`, orthogonal, so it changes nothing but the
  quantisation error); here index keys are kept in `dsa.index_dtype` (bfloat16 by default: a 64-feature
  key is 128 bytes a token in the decoding cache), in training and decoding alike, so that cached
  decoding chooses what the parallel pass chooses. With random weights the former front end (no
  LayerNorm, every feature rotated) chose overlapping sets of only 48-68% of tokens with this one
  (issue 34's measurement); DSA runs before 2026-12-07 used the former.
- **Metrics** (train steps): `indexer_kl` (the loss term before `dsa.kl_weight`) and `indexer_recall`,
  the share of the dense attention's top-k tokens (mean over heads) that the indexer's selection covers,
  measured on the last `dsa.recall_queries` queries of each row (the ones with the most candidates).
- **Granularity**: `dsa.block_size` = 1 is the paper's (tokens, `pallas_kernels.token_attention`);
  L > 1 scores a block by its best token (the max of `I` over the block's visible tokens) and chooses
  `top_k / L` blocks with `block_choice.select_blocks` (the query's own block forced, causal inside it),
  attended by `selected_attention`: what a TPU wants, which has no token-gather body.
- **Documents** (`seg_BT`, a packed row): the indexer scores, and the KL and recall measure, only the
  earlier tokens of the query's own document (its keys rotated at their positions in the document), so
  the top-k lists hold none of another document and the attention kernels, which attend exactly the
  listed keys, need no segment mask: a document's lists are its lists alone, shifted by its start. Tokens
  need no alignment; blocks (L > 1) are chosen from the first block wholly inside the document
  (`block_choice.first_block`), and the packer starts each document on the block grid
  (`document_alignment`) so that a document's blocks are its blocks alone. The dense warm-up keeps to
  the document by segment ids.

Context parallelism (`mesh.context`, sparse_lm/context.py; `_split`): every device gathers the index keys
(one head of `index_head_dim`, the paper's cheap part to move) and the keys and values whole (a query may
choose any earlier token), then scores, chooses and attends for its own queries at their places in the
row with the XLA references; the indexer's KL and recall are returned per query and averaged over the
whole batch, as on one device. Gathering the keys and values whole holds 2 x T x Hkv x D values a layer
at once; fetching only the chosen rows (at most T / C x top_k a device, usually far fewer distinct) is
the step after.

Costs. The indexer is quadratic in FLOPs, as in the paper: `2 * index_heads * (index_head_dim + 1)`
FLOPs per (query, earlier token), forward only (the top-k is discrete), against `4 * num_heads *
head_dim` for dense attention's two matmuls forward; the paper's 64 x 128 indexer in FP8 is cheap per
entry, this one runs in the compute dtype. Memory is linear in T: the scores exist for `_ELEMENTS /
(index_heads * T)` queries at a time (`map_query_chunks`), then only the `[B, T, top_k]` lists are kept;
no `[T, T]` matrix on any path. The KL of the sparse stage recomputes the main attention's scores
on the selected tokens (forward, detached) and the indexer's on them (forward and backward).
`attended_keys` counts all of that for the sparse stage; the dense warm-up costs dense attention plus a
dense KL.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels._common import vary_alike
from pallas_kernels._reference import MASK_VALUE, map_query_chunks
from pallas_kernels.block_choice import segment_starts, select_blocks
from pallas_kernels.flash_attention import attention_with_lse_reference
from pallas_kernels.selected_attention import selected_attention, selected_attention_reference
from pallas_kernels.token_attention import token_attention, token_attention_reference
from sparse_lm import context, sharding
from sparse_lm.attention import dense, kv_cache
from sparse_lm.errors import ConfigError, require_positive
from sparse_lm.layers import AuxLoss, param, rope

_INDEX_DTYPES = ('bfloat16', 'float32')
# torch.nn.LayerNorm's default, which the reference's `k_norm` uses.
_NORM_EPS = 1e-5

# Elements of the score (and gathered key) arrays that the indexer and its loss hold at once per batch
# row, float32: 64 MiB.
_ELEMENTS = 2**24


class WarmupClock(nnx.Variable):
  """Train steps a DSA layer has taken (float32: microbatch means keep it whole); never a gradient."""


class Attention(dense.Attention):
  """Dense attention's projections, a lightning indexer and top-k token (or block) selection."""

  context_parallel = True

  segments = True

  @classmethod
  def document_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    return cfg.dsa.block_size

  @staticmethod
  def defaults() -> dict:
    d = ml_collections.ConfigDict()
    # The paper's are 64 heads of 128 and top-k 2048 at 128K tokens; these do sparse work on the
    # default config's 256 tokens (64 of them chosen).
    d.index_heads = 4
    d.index_head_dim = 32
    d.top_k = 64  # tokens a query attends to (a multiple of block_size)
    d.block_size = 1  # 1: tokens, as the paper; L > 1: blocks of L tokens
    d.dense_warmup_steps = 0  # train steps of dense attention while the indexer fits
    d.kl_weight = 1.0  # the indexer's KL in the loss (it reaches only the indexer)
    d.recall_queries = 32  # queries per row on which indexer_recall is measured
    # The index front end of DeepSeek's reference code (see the docstring): a LayerNorm on the index
    # key, RoPE on the first `index_rope_dim` index features only, and index keys kept (and scored) in
    # `index_dtype`, in training and in the decoding cache alike.
    d.key_norm = True
    d.index_rope_dim = 64
    d.index_dtype = 'bfloat16'  # or 'float32'
    return {'dsa': d}

  @staticmethod
  def tiny_config() -> dict:
    return {'dsa': {'index_heads': 2, 'index_head_dim': 8, 'top_k': 8, 'recall_queries': 8}}

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    d = cfg.dsa
    require_positive(d, 'model.dsa', ('index_heads', 'index_head_dim', 'top_k', 'block_size',
                                      'recall_queries', 'index_rope_dim'))
    if d.top_k % d.block_size:
      raise ConfigError(f'model.dsa.top_k={d.top_k} must be a multiple of model.dsa.block_size='
                        f'{d.block_size} (top_k / block_size blocks are chosen)')
    if not isinstance(d.dense_warmup_steps, int) or d.dense_warmup_steps < 0:
      raise ConfigError(f'model.dsa.dense_warmup_steps={d.dense_warmup_steps!r} must be an integer >= 0')
    if d.index_rope_dim % 2:
      raise ConfigError(f'model.dsa.index_rope_dim={d.index_rope_dim} must be even (RoPE rotates pairs)')
    if d.index_dtype not in _INDEX_DTYPES:
      raise ConfigError(f'model.dsa.index_dtype={d.index_dtype!r} is not one of {_INDEX_DTYPES}')
    if not isinstance(d.key_norm, bool):
      raise ConfigError(f'model.dsa.key_norm={d.key_norm!r} must be true or false')
    if not isinstance(d.kl_weight, (int, float)) or d.kl_weight < 0:
      raise ConfigError(f'model.dsa.kl_weight={d.kl_weight!r} must be a number >= 0')

  @staticmethod
  def attended_keys(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """The sparse stage's train step, in keys of one query head (12 head_dim FLOPs each, forward and
    backward): the chosen keys; the indexer on every earlier token (forward); the KL's main scores
    (forward, all heads, 2 head_dim FLOPs a key) and indexer scores (forward and backward) on the chosen
    keys; and the recall's dense scores and index scores of `recall_queries` queries a row."""
    d, H, D = cfg.dsa, cfg.num_heads, cfg.head_dim
    per_key = 12 * H * D  # FLOPs of one attended key, over all query heads
    index = 2 * d.index_heads * (d.index_head_dim + 1)  # FLOPs of one index score, forward
    L, total = d.block_size, 0.0
    for t in range(seq_len):
      if L == 1:
        chosen = min(t + 1, d.top_k)
      else:
        begun = t // L + 1
        chosen = t % L + 1 + (min(d.top_k // L, begun) - 1) * L
      kl = chosen * (2 * H * D + 3 * index)
      total += chosen + ((t + 1) * index + kl) / per_key
    # recall_queries x seq_len (query, key) pairs a row: per position, recall_queries pairs.
    recall = min(d.recall_queries, seq_len) * (2 * H * D + index)
    return total / seq_len + recall / per_key

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    # The indexer's input is detached: its backward computes weight gradients only (4 of the 6 FLOPs).
    del cfg
    return {**dict.fromkeys(('index_wq', 'index_wk', 'index_ww'), 2 / 3), 'index_norm_scale': 0.0,
            'index_norm_bias': 0.0}

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    d, i, e, pd = cfg.d_model, cfg.dsa.index_heads, cfg.dsa.index_head_dim, cfg.param_dtype
    # Replicated: the indexer is small, and its heads need not divide the tensor axis.
    self.index_wq = param(rngs, (d, i, e), ('embed', None, None), stddev=d**-0.5, dtype=pd)
    self.index_wk = param(rngs, (d, e), ('embed', None), stddev=d**-0.5, dtype=pd)
    self.index_ww = param(rngs, (d, i), ('embed', None), stddev=d**-0.5, dtype=pd)
    if cfg.dsa.key_norm:  # LayerNorm's gain and bias (the reference's `k_norm`)
      self.index_norm_scale = nnx.Param(jnp.ones((e,), jnp.dtype(pd)), axes=(None,))
      self.index_norm_bias = nnx.Param(jnp.zeros((e,), jnp.dtype(pd)), axes=(None,))
    self.clock = WarmupClock(jnp.zeros((), jnp.float32))
    self.dsa = ml_collections.FrozenConfigDict(cfg.dsa)

  # ----------------------------------------------------------------------------- the indexer

  def _indexer(self, x_BTD, pos_BT):
    """Index queries `[B, T, I, D]`, weights `[B, T, I]` and keys `[B, T, D]`, from the detached input;
    queries and keys in `dsa.index_dtype`."""
    d = self.dsa
    x_BTD = jax.lax.stop_gradient(x_BTD.astype(self.dtype))
    qi_BTID = jnp.einsum('btd,dih->btih', x_BTD, self.index_wq[...].astype(self.dtype))
    ki_BTD = jnp.einsum('btd,dh->bth', x_BTD, self.index_wk[...].astype(self.dtype))
    w_BTI = jnp.einsum('btd,di->bti', x_BTD, self.index_ww[...].astype(self.dtype),
                       preferred_element_type=jnp.float32) * d.index_heads**-0.5
    if d.key_norm:
      k32_BTD = ki_BTD.astype(jnp.float32)
      mean_BT1 = jnp.mean(k32_BTD, axis=-1, keepdims=True)
      var_BT1 = jnp.mean(jnp.square(k32_BTD - mean_BT1), axis=-1, keepdims=True)
      k32_BTD = (k32_BTD - mean_BT1) * jax.lax.rsqrt(var_BT1 + _NORM_EPS)
      ki_BTD = (k32_BTD * self.index_norm_scale[...].astype(jnp.float32)[None, None, :]
                + self.index_norm_bias[...].astype(jnp.float32)[None, None, :]).astype(self.dtype)
    rotated = min(d.index_rope_dim, d.index_head_dim)
    qi_BTID = rope(qi_BTID, pos_BT, self.rope_theta, rotated)
    ki_BTD = rope(ki_BTD[:, :, None], pos_BT, self.rope_theta, rotated)[:, :, 0]
    dtype = jnp.dtype(d.index_dtype)
    return qi_BTID.astype(dtype), w_BTI, ki_BTD.astype(dtype)

  @staticmethod
  def _chunk(per_query: int) -> int:
    """Queries per chunk when each holds `per_query` elements."""
    return max(1, _ELEMENTS // per_query)

  def _index_scores(self, qi_BQID, w_BQI, ki_BXD):
    """`I[t, s]` (Eq. 1) of the chunk's queries against keys `[B, X, D]` (or `[B, Q, X, D]`, per query)."""
    scale = self.dsa.index_head_dim**-0.5
    if ki_BXD.ndim == 3 and qi_BQID.shape[1] <= 8:
      # A few queries (decoding) against every cached key: keys first, as the cache is laid out, so the
      # product streams the keys once (1.7x faster at 65,536 keys on the CPU than queries first).
      dots_BXQI = jnp.einsum('bxd,bqid->bxqi', ki_BXD, qi_BQID, preferred_element_type=jnp.float32)
      return jnp.einsum('bxqi,bqi->bqx', jax.nn.relu(dots_BXQI * scale), w_BQI)
    spec = 'bqid,bxd->bqix' if ki_BXD.ndim == 3 else 'bqid,bqxd->bqix'
    dots_BQIX = jnp.einsum(spec, qi_BQID, ki_BXD, preferred_element_type=jnp.float32)
    return jnp.einsum('bqix,bqi->bqx', jax.nn.relu(dots_BQIX * scale), w_BQI)

  def _select(self, qi_BTID, w_BTI, ki_BSD, qpos_BT, lo_BT=None, new_ki_BTD=None) -> jax.Array:
    """`[B, T, 1, n]` chosen tokens (L = 1) or blocks, one list that every kv group shares; -1: unused.
    Query t (at key slot `qpos_BT`) chooses among the slots from `lo_BT` (its document's start; 0
    without documents) to itself. With `new_ki_BTD` (decoding), `ki_BSD` is the cache before the new
    tokens, whose index keys go to slots `qpos_BT[0]`: scored apart, so the cache is read before it is
    written."""
    S, L, top_k = ki_BSD.shape[1], self.dsa.block_size, self.dsa.top_k
    lo_BT = jnp.zeros_like(qpos_BT) if lo_BT is None else lo_BT

    def scores(qi_BQID, w_BQI):
      score_BQS = self._index_scores(qi_BQID, w_BQI, ki_BSD)
      if new_ki_BTD is None:
        return score_BQS
      new_BQT = self._index_scores(qi_BQID, w_BQI, new_ki_BTD)
      return jax.lax.dynamic_update_slice_in_dim(score_BQS, new_BQT, qpos_BT[0, 0], axis=2)

    def one_chunk(qi_BQID, w_BQI, pos_BQ, lo_BQ):
      visible_BQS = _span(S, pos_BQ, lo_BQ)
      score_BQS = jnp.where(visible_BQS, scores(qi_BQID, w_BQI), -jnp.inf)
      score_BQS = jax.lax.stop_gradient(score_BQS)  # the choice is discrete
      if L == 1:
        top_BQn, idx_BQn = jax.lax.top_k(score_BQS, min(top_k, S))
        return jnp.where(top_BQn == -jnp.inf, -1, idx_BQn).astype(jnp.int32)[:, :, None]
      N = -(-S // L)
      score_BQNL = jnp.pad(score_BQS, ((0, 0), (0, 0), (0, N * L - S)), constant_values=-jnp.inf)
      block_BQN = jnp.max(score_BQNL.reshape(*score_BQS.shape[:2], N, L), axis=-1)
      return select_blocks(block_BQN[:, :, None], pos_BQ, num_selected=top_k // L, block_size=L,
                           force_first=False, force_local=1, first_BT=-(-lo_BQ // L))
    # Padded queries sit at position -1: they see no token and choose nothing.
    return map_query_chunks(one_chunk, (qi_BTID, w_BTI, qpos_BT, lo_BT), (0, 0, -1, 0),
                            chunk=self._chunk(self.dsa.index_heads * S))

  # ----------------------------------------------------------------------------- the indexer's loss

  def _target(self, q_BQHD, k_BXKD, visible_BQX):
    """The main attention's distribution over keys, the mean of the heads' softmaxes, detached: keys
    `[B, X, K, D]` shared by the chunk or `[B, Q, X, K, D]` per query."""
    B, Q, H, D = q_BQHD.shape
    K = k_BXKD.shape[-2]
    q_BQKGD = jax.lax.stop_gradient(q_BQHD).reshape(B, Q, K, H // K, D)
    spec = 'bqkgd,bxkd->bqkgx' if k_BXKD.ndim == 4 else 'bqkgd,bqxkd->bqkgx'
    s_BQKGX = jnp.einsum(spec, q_BQKGD, jax.lax.stop_gradient(k_BXKD),
                         preferred_element_type=jnp.float32) * D**-0.5
    s_BQKGX = jnp.where(visible_BQX[:, :, None, None], s_BQKGX, MASK_VALUE)
    return jnp.mean(jax.nn.softmax(s_BQKGX, axis=-1), axis=(2, 3)) * visible_BQX

  @staticmethod
  def _kl(p_BQX, index_BQX, visible_BQX):
    """Per query KL(p || softmax of the index scores over the visible keys), and which queries count."""
    log_q_BQX = jax.nn.log_softmax(jnp.where(visible_BQX, index_BQX, MASK_VALUE), axis=-1)
    safe_BQX = jnp.where(p_BQX > 0, p_BQX, 1.0)
    kl_BQ = jnp.sum(jnp.where(p_BQX > 0, p_BQX * (jnp.log(safe_BQX) - log_q_BQX), 0.0), axis=-1)
    return kl_BQ, jnp.any(visible_BQX, axis=-1)

  def _dense_kl(self, q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, lo_BT=None):
    """The warm-up's loss: over every earlier token (of the query's document). Per query: the KL and
    whether it counts (`_mean_over_queries` averages them)."""
    S = k_BTKD.shape[1]
    lo_BT = jnp.zeros_like(pos_BT) if lo_BT is None else lo_BT

    def one_chunk(q_BQHD, qi_BQID, w_BQI, pos_BQ, lo_BQ):
      visible_BQS = _span(S, pos_BQ, lo_BQ)
      return self._kl(self._target(q_BQHD, k_BTKD, visible_BQS), self._index_scores(qi_BQID, w_BQI, ki_BTD),
                      visible_BQS)
    chunk = self._chunk(max(q_BTHD.shape[2], self.dsa.index_heads) * S)
    return map_query_chunks(one_chunk, (q_BTHD, qi_BTID, w_BTI, pos_BT, lo_BT), (0, 0, 0, -1, 0), chunk=chunk)

  def _sparse_kl(self, q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, idx_BT1n, pos_BT):
    """The sparse stage's loss: over the selected tokens only (Sec. 2.1.1, the second stage). Per query,
    as `_dense_kl`."""
    L = self.dsa.block_size

    def one_chunk(q_BQHD, qi_BQID, w_BQI, idx_BQn, pos_BQ):
      kpos_BQnL = jnp.maximum(idx_BQn, 0)[..., None] * L + jnp.arange(L)[None, None, None]
      visible_BQnL = (idx_BQn >= 0)[..., None] & (kpos_BQnL <= pos_BQ[:, :, None, None])
      kpos_BQX = kpos_BQnL.reshape(*idx_BQn.shape[:2], -1)
      visible_BQX = visible_BQnL.reshape(kpos_BQX.shape)
      k_BQXKD = jnp.take_along_axis(k_BTKD[:, None], kpos_BQX[..., None, None], axis=2, mode='clip')
      ki_BQXD = jnp.take_along_axis(ki_BTD[:, None], kpos_BQX[..., None], axis=2, mode='clip')
      return self._kl(self._target(q_BQHD, k_BQXKD, visible_BQX), self._index_scores(qi_BQID, w_BQI, ki_BQXD),
                      visible_BQX)
    X, K, D = idx_BT1n.shape[-1] * L, k_BTKD.shape[2], k_BTKD.shape[3]
    chunk = self._chunk(X * (max(q_BTHD.shape[2], self.dsa.index_heads) + K * D + ki_BTD.shape[-1]))
    return map_query_chunks(one_chunk, (q_BTHD, qi_BTID, w_BTI, idx_BT1n[:, :, 0], pos_BT), (0, 0, 0, -1, -1),
                            chunk=chunk)

  def _recall(self, q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, lo_BT=None) -> jax.Array:
    """The share of the dense attention's top-k tokens that the selection covers, over the last
    `recall_queries` queries of each row."""
    R = min(self.dsa.recall_queries, pos_BT.shape[1])
    covered_BR, wanted_BR = self._recall_terms(q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, lo_BT, R)
    return jnp.sum(covered_BR) / jnp.maximum(jnp.sum(wanted_BR), 1)

  def _recall_terms(self, q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, lo_BT, R: int):
    """For each of the last R queries: how many of the dense attention's top-k tokens the selection
    covers, and how many it wants (fewer than top_k while fewer tokens are visible)."""
    B = pos_BT.shape[0]
    S, L = k_BTKD.shape[1], self.dsa.block_size
    lo_BT = jnp.zeros_like(pos_BT) if lo_BT is None else lo_BT
    qpos_BR, lo_BR = pos_BT[:, -R:], lo_BT[:, -R:]
    idx_BRn = self._select(qi_BTID[:, -R:], w_BTI[:, -R:], ki_BTD, qpos_BR, lo_BR)[:, :, 0]
    visible_BRS = _span(S, qpos_BR, lo_BR)
    p_BRS = self._target(q_BTHD[:, -R:], k_BTKD, visible_BRS)
    _, top_BRk = jax.lax.top_k(p_BRS, min(self.dsa.top_k, S))
    # Fewer earlier tokens than top_k: only those count.
    wanted_BRk = jnp.take_along_axis(visible_BRS, top_BRk, axis=-1)
    N = -(-S // L)
    b_B11, r_1R1 = jnp.arange(B)[:, None, None], jnp.arange(R)[None, :, None]
    slot_BRn = jnp.where(idx_BRn >= 0, idx_BRn, N)
    chosen_BRN = jnp.zeros((B, R, N + 1), bool).at[b_B11, r_1R1, slot_BRn].set(True)
    covered_BRk = jnp.take_along_axis(chosen_BRN, top_BRk // L, axis=-1)
    return jnp.sum(covered_BRk & wanted_BRk, axis=-1), jnp.sum(wanted_BRk, axis=-1)

  # ----------------------------------------------------------------------------- the layer

  def _sparse_attend(self, q_BTHD, k_BTKD, v_BTKD, idx_BT1n):
    if self.dsa.block_size == 1:
      attend = functools.partial(token_attention, implementation=self.kernel)
    else:
      attend = functools.partial(selected_attention, block_size=self.dsa.block_size,
                                 implementation=self.kernel)
    return sharding.attention_per_device(attend, q_BTHD, k_BTKD, v_BTKD, idx_BT1n)

  def _in_warmup(self) -> jax.Array:
    return jax.lax.stop_gradient(self.clock[...]) < self.dsa.dense_warmup_steps

  def _staged(self, dense_fn, sparse_fn, *args):
    """`sparse_fn(*args)`, or `dense_fn(*args)` while the warm-up lasts."""
    if self.dsa.dense_warmup_steps == 0:
      return sparse_fn(*args)
    return jax.lax.cond(self._in_warmup(), dense_fn, sparse_fn, *args)

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: dict | None = None, *, update_state: bool = False) -> tuple[jax.Array, dict | None]:
    q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, pos_BT)
    qi_BTID, w_BTI, ki_BTD = self._indexer(x_BTD, pos_BT)
    if cache is not None:
      o_BTHD, cache = self._decode(q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, cache)
      return self._output(o_BTHD), cache
    # Keys are slots of the row: each query sits at its own slot and sees back to its document's start
    # (the row's start without documents, when the positions are the slots).
    B, T = pos_BT.shape
    slot_BT = pos_BT if seg_BT is None else jnp.broadcast_to(jnp.arange(T, dtype=pos_BT.dtype), (B, T))
    lo_BT = jnp.zeros_like(slot_BT) if seg_BT is None else segment_starts(seg_BT)

    no_kl = jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), bool)

    def dense_stage(q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD):
      o_BTHD = self.attend(q_BTHD, k_BTKD, v_BTKD, seg_BT)  # dense attention's
      kl = self._dense_kl(q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, slot_BT, lo_BT) if update_state else no_kl
      return o_BTHD, kl

    def sparse_stage(q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD):
      idx_BT1n = self._select(qi_BTID, w_BTI, ki_BTD, slot_BT, lo_BT)
      o_BTHD = self._sparse_attend(q_BTHD, k_BTKD, v_BTKD, idx_BT1n)
      kl = (self._sparse_kl(q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, idx_BT1n, slot_BT) if update_state
            else no_kl)
      return o_BTHD, kl

    if context.size() > 1:
      o_BTHD, kl, recall = self._split(q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, seg_BT, update_state)
    else:
      o_BTHD, kl = self._staged(dense_stage, sparse_stage, q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD)
      kl = _mean_over_queries(*kl) if update_state else jnp.zeros((), jnp.float32)
      recall = self._recall(q_BTHD, k_BTKD, qi_BTID, w_BTI, ki_BTD, slot_BT, lo_BT) if update_state else None
    if update_state:  # the train step: the indexer's loss, its metrics, and the warm-up's clock
      self.sow(AuxLoss, 'indexer_kl_aux_loss', self.dsa.kl_weight * kl)
      self.sow(nnx.Intermediate, 'indexer_kl', kl)
      self.sow(nnx.Intermediate, 'indexer_recall', recall)
      self.sow(nnx.Intermediate, 'dense_warmup', self._in_warmup().astype(jnp.float32))
      self.clock[...] = self.clock[...] + 1
    return self._output(o_BTHD), cache

  def _split(self, q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, seg_BT, update_state: bool):
    """The layer under `mesh.context` (sparse_lm/context.py), each sequence split in its zigzag order:
    every device gathers the index keys (one small head) and the keys and values whole (its queries
    may choose any earlier token), then scores, chooses and attends for its own queries at their
    places in the row, with the XLA references (the kernels place queries at 0..T-1). The indexer's
    loss and recall come back per query and are averaged over the whole batch here, as one device
    averages them. Returns the output, the KL and the recall (None outside a train step)."""
    C, R = context.size(), min(self.dsa.recall_queries, q_BTHD.shape[1])
    L, documents = self.dsa.block_size, seg_BT is not None

    def share(q_BLHD, k_BLKD, v_BLKD, qi_BLID, w_BLI, ki_BLD, *rest):
      seg_BL = rest[0] if documents else None
      warmup = rest[-1]
      B, c = q_BLHD.shape[0], q_BLHD.shape[1] // 2
      rows_L = context.natural_rows(C, c)
      rows_BL = jnp.broadcast_to(rows_L, (B, 2 * c))
      k_BTKD, v_BTKD, ki_BTD = (context.gather_sequence(x, C) for x in (k_BLKD, v_BLKD, ki_BLD))
      T = k_BTKD.shape[1]
      seg_all = None if seg_BL is None else context.gather_sequence(seg_BL, C)
      lo_BL = jnp.zeros_like(rows_BL) if seg_BL is None else segment_starts(seg_all)[:, rows_L]
      no_kl = jnp.zeros(rows_BL.shape, jnp.float32), jnp.zeros(rows_BL.shape, bool)

      def dense_stage():
        o_BLHD, _ = attention_with_lse_reference(
            q_BLHD, k_BTKD, v_BTKD, causal=True, qpos_BT=rows_BL,
            kpos_BS=jnp.broadcast_to(jnp.arange(T), (B, T)),
            segment_ids=None if seg_BL is None else (seg_BL, seg_all))
        kl = (self._dense_kl(q_BLHD, k_BTKD, qi_BLID, w_BLI, ki_BTD, rows_BL, lo_BL) if update_state
              else no_kl)
        return alike(o_BLHD, kl)

      def sparse_stage():
        idx_BL1n = self._select(qi_BLID, w_BLI, ki_BTD, rows_BL, lo_BL)
        o_BLHD = selected_attention_reference(q_BLHD, k_BTKD, v_BTKD, idx_BL1n, block_size=L, qpos_BT=rows_BL)
        kl = (self._sparse_kl(q_BLHD, k_BTKD, qi_BLID, w_BLI, ki_BTD, idx_BL1n, rows_BL) if update_state
              else no_kl)
        return alike(o_BLHD, kl)

      def alike(o_BLHD, kl):  # both branches of the cond vary over the same mesh axes as the queries
        _, o_BLHD, *kl = vary_alike(q_BLHD, o_BLHD, *kl)
        return o_BLHD, tuple(kl)
      if self.dsa.dense_warmup_steps == 0:
        o_BLHD, (kl_BL, counts_BL) = sparse_stage()
      else:
        o_BLHD, (kl_BL, counts_BL) = jax.lax.cond(warmup, dense_stage, sparse_stage)
      # Recall on the row's last R queries: those of this device's late chunk at positions >= T - R,
      # all among its chunk's last min(R, c).
      covered_BL = wanted_BL = jnp.zeros(rows_BL.shape, jnp.int32)
      if update_state:
        m = min(R, c)
        covered_Bm, wanted_Bm = self._recall_terms(q_BLHD, k_BTKD, qi_BLID, w_BLI, ki_BTD, rows_BL, lo_BL, m)
        late_Bm = rows_BL[:, -m:] >= T - R
        pad = ((0, 0), (2 * c - m, 0))
        covered_BL = jnp.pad(jnp.where(late_Bm, covered_Bm, 0), pad).astype(jnp.int32)
        wanted_BL = jnp.pad(jnp.where(late_Bm, wanted_Bm, 0), pad).astype(jnp.int32)
      return o_BLHD, kl_BL, counts_BL, covered_BL, wanted_BL
    B, T = q_BTHD.shape[:2]
    args = (q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD) + (() if seg_BT is None else (seg_BT,))
    out = (jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), jax.ShapeDtypeStruct((B, T), jnp.float32),
           jax.ShapeDtypeStruct((B, T), bool), jax.ShapeDtypeStruct((B, T), jnp.int32),
           jax.ShapeDtypeStruct((B, T), jnp.int32))
    o_BTHD, kl_BT, counts_BT, covered_BT, wanted_BT = context.per_share(
        share, *args, out_shape=out, replicated=(self._in_warmup(),))
    if not update_state:
      return o_BTHD, jnp.zeros((), jnp.float32), None
    return (o_BTHD, _mean_over_queries(kl_BT, counts_BT),
            jnp.sum(covered_BT) / jnp.maximum(jnp.sum(wanted_BT), 1))

  # ----------------------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int) -> dict:
    """Dense attention's rows and the index keys, in `dsa.index_dtype` (a quarter of a 128-value K/V
    row at the reference's 64 bfloat16 features against 2 x 128 float32 values here)."""
    return {**super().init_cache(batch, max_len),
            'ki': jnp.zeros((batch, max_len, self.dsa.index_head_dim), jnp.dtype(self.dsa.index_dtype))}

  def _decode(self, q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, cache):
    """New tokens against the cache. A prompt into an empty cache runs the whole-sequence path (the
    kernels), then writes the cache; otherwise the new rows are written and the indexer scores every
    cached index key, and only the chosen rows are gathered. Slots not yet written hold positions after
    every query, so neither the selection nor the attention sees them."""
    args = (q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, cache)
    return kv_cache.prefill_or_extend(pos_BT[0, 0], q_BTHD.shape[1], self._prefill, self._extend, *args)

  def _written(self, cache, k_BTKD, v_BTKD, pos_BT, ki_BTD):
    cache = super()._written(cache, k_BTKD, v_BTKD, pos_BT)
    return {**cache, 'ki': kv_cache.write_rows(cache['ki'], ki_BTD, pos_BT[0, 0])}

  def _prefill(self, q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, cache):
    def dense_stage(q_BTHD, qi_BTID, w_BTI):
      del qi_BTID, w_BTI
      return self.attend(q_BTHD, k_BTKD, v_BTKD)

    def sparse_stage(q_BTHD, qi_BTID, w_BTI):
      return self._sparse_attend(q_BTHD, k_BTKD, v_BTKD, self._select(qi_BTID, w_BTI, ki_BTD, pos_BT))
    o_BTHD = self._staged(dense_stage, sparse_stage, q_BTHD, qi_BTID, w_BTI)
    return o_BTHD, self._written(cache, k_BTKD, v_BTKD, pos_BT, ki_BTD)

  def _extend(self, q_BTHD, k_BTKD, v_BTKD, qi_BTID, w_BTI, ki_BTD, pos_BT, cache):
    # K and V are written first (the chosen rows are gathered, which XLA orders after an in-place write);
    # the index keys after the indexer has scored the whole cache (`kv_cache.after`).
    ki_BSD = cache['ki']
    cache = super()._written(cache, k_BTKD, v_BTKD, pos_BT)
    B, T = pos_BT.shape
    S, L = cache['k'].shape[1], self.dsa.block_size

    def dense_stage(q_BTHD, qi_BTID, w_BTI):
      del qi_BTID, w_BTI
      keep_BTS = jnp.arange(S)[None, None, :] <= pos_BT[:, :, None]
      return kv_cache.attend(q_BTHD, cache['k'], cache['v'], keep_BTS)

    def sparse_stage(q_BTHD, qi_BTID, w_BTI):
      idx_BT1n = self._select(qi_BTID, w_BTI, ki_BSD, pos_BT, new_ki_BTD=ki_BTD)
      if T > 1:  # a chunk of tokens after cached ones: each its own list, a chunk of queries at a time
        if L == 1:
          return token_attention_reference(q_BTHD, cache['k'], cache['v'], idx_BT1n, qpos_BT=pos_BT)
        return selected_attention_reference(q_BTHD, cache['k'], cache['v'], idx_BT1n, block_size=L,
                                            qpos_BT=pos_BT)
      if L > 1:
        K = cache['k'].shape[2]
        idx_BTKn = jnp.broadcast_to(idx_BT1n, (B, T, K, idx_BT1n.shape[-1]))
        return kv_cache.attend_blocks(q_BTHD, cache['k'], cache['v'], idx_BTKn, block_size=L, pos_BT=pos_BT)
      # One token: its chosen rows, shared by every head, gathered once and attended as a small cache.
      idx_Bn = idx_BT1n[:, 0, 0]
      rows_Bn11 = jnp.clip(idx_Bn, 0, S - 1)[:, :, None, None]
      k_BnKD, v_BnKD = (jnp.take_along_axis(cache[name], rows_Bn11, axis=1) for name in ('k', 'v'))
      return kv_cache.attend(q_BTHD, k_BnKD, v_BnKD, (idx_Bn >= 0)[:, None, :])
    o_BTHD = self._staged(dense_stage, sparse_stage, q_BTHD, qi_BTID, w_BTI)
    ki_BTD = kv_cache.after(ki_BTD, o_BTHD)
    return o_BTHD, {**cache, 'ki': kv_cache.write_rows(ki_BSD, ki_BTD, pos_BT[0, 0])}


def _span(S: int, pos_BQ, lo_BQ):
  """`[B, Q, S]`: the key slots `lo <= s <= pos` each query sees."""
  s_11S = jnp.arange(S)[None, None, :]
  return (s_11S <= pos_BQ[:, :, None]) & (s_11S >= lo_BQ[:, :, None])


def _mean_over_queries(kl_BT, counts_BT):
  return jnp.sum(kl_BT * counts_BT) / jnp.maximum(jnp.sum(counts_BT), 1)
