"""Mixture of Sparse Attention (Piękos, Csordás & Schmidhuber 2025, "Mixture of Sparse Attention:
Content-Based Learnable Sparse Attention via Expert-Choice Routing", arXiv:2505.00315).

A layer is `model.num_heads` dense causal heads (the paper keeps a few, about 4) beside
`model.mosa.num_heads` MoSA heads. A MoSA head m:
- scores every token with its router, `r_t = sigmoid(x_t . w_r)`;
- takes `k = T / rho` tokens by expert-choice top-k over the sequence (optionally the first token
  always), sorted by position;
- projects only those tokens to Q/K/V, rotates them at their original positions (RoPE) and attends
  causally among them: sorted by position, the original-position mask is the ordinary causal mask over
  the k slots, so `pallas_kernels.flash_attention` serves;
- projects back to the model width, scales by `r_t` (the router's only gradient path) and adds the result
  at the tokens' places.
Gathers and scatters are `[B, heads, k, .]`: memory grows with k, not T, and nothing is `[.., T, T]`.

Causality. The top-k looks at the whole sequence, so whether token t is taken, and so its output, depends
on later tokens (the paper lists this as a limitation). `Attention` is that faithful version, flagged
`causal = False`. `CausalAttention` (`mosa_causal`) departs from the paper so that a language model can be
scored and sampled honestly: head m takes token t iff its router logit exceeds a threshold `tau_m`, a
non-parameter state the train step moves toward the target share `1 / rho` (as the MoE balancing bias,
Wang et al. 2024); taken tokens fill a head's slots in position order, and a token whose rank among the
taken ones exceeds `capacity_factor * (t + 1) / rho` is dropped, a rule that looks only backward. The
decoding cache keeps each head's chosen keys and values.

Documents in a packed row (`seg_BT`). A head chooses within each document what it would choose from the
document alone: `mosa` the top `k(n) = min(n, max(2, n // rho))` of each document of n tokens (the first
token of each document always, with `include_first`), `mosa_causal` by the same threshold with its
capacity bound counted from each document's start (`document_slots`, `causal_slots`). The chosen tokens
of all documents fill the head's slots in position order, and slot attention keeps each slot to the
slots of its own document (segment ids over the slots), so a document's slots see what they see alone.
Per-document rounding can need more slots than the row's `k(T)` (a document of n < 2 rho tokens still
takes 2), so under segments a head runs twice its slots (at most T); what still does not fit is dropped
from the row's last documents and counted (`mosa_dropped_share`). The choice is per document rather
than over the whole row because a row-wide top-k gives a document a share of slots that depends on its
neighbours, which is a leak between documents by construction.

Context parallelism (`mesh.context`, sparse_lm/context.py, "slots"): the dense heads run the ring; the
choice is made on every device from the router logits in the row's natural order (gathered: one number a
token and head), so it is the one device's choice; each device then runs every slot of 1/C of the MoSA
heads (a reduce-scatter of the slots' rows, heads padded to a multiple of C) and an all-gather returns
the outputs to the devices holding their tokens (`_sparse_heads_split`).
"""

import functools
import math
import statistics

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels._reference import MASK_VALUE
from pallas_kernels.block_choice import segment_ends, segment_starts
from pallas_kernels.flash_attention import flash_attention
from sparse_lm import context, sharding
from sparse_lm.attention import dense
from sparse_lm.errors import ConfigError, require_positive
from sparse_lm.layers import output_stddev, param, rope

Cache = dict


# ----------------------------------------------------------------------------- the isoFLOP rule

def _score_pairs(n: int, causal_mask: bool) -> float:
  """Query-key pairs of attention over n tokens: n^2 as the paper counts, n (n + 1) / 2 causally."""
  return n * (n + 1) / 2 if causal_mask else n * n


def dense_head_flops(d_model: int, head_dim: int, seq_len: int, kv_heads: int | None = None,
                     heads: int = 1, causal_mask: bool = False) -> float:
  """Forward FLOPs of `heads` dense heads over a sequence: Q/O projections per query head and K/V per
  kv head (4 T h h' each), score and value products per query head (4 h' a pair). With one kv head per
  query head (`kv_heads=None`) and every pair counted (`causal_mask=False`), one head is the paper's
  isoFLOP unit, 8 T h h' + 4 T^2 h'; `causal_mask=True` counts only the pairs a causal mask keeps, as
  `sparse_lm.flops` does."""
  kv_heads = heads if kv_heads is None else kv_heads
  return (4 * (heads + kv_heads) * seq_len * d_model * head_dim
          + 4 * heads * _score_pairs(seq_len, causal_mask) * head_dim)


def mosa_head_flops(d_model: int, head_dim: int, seq_len: int, sparsity: int,
                    capacity_factor: float | None = None, causal_mask: bool = False) -> float:
  """One MoSA head: the same products over its slots, plus the router over all T (2 T h). The paper's
  head has k = T / rho slots; mosa_causal's has `capacity_factor` times as many (`head_slots`)."""
  k = head_slots(seq_len, sparsity, capacity_factor)
  return 8 * k * d_model * head_dim + 4 * _score_pairs(k, causal_mask) * head_dim + 2 * seq_len * d_model


def isoflop_heads(d_model: int, head_dim: int, dense_heads: int, seq_len: int, sparsity: int,
                  kept_dense_heads: int, *, dense_kv_heads: int | None = None,
                  kept_kv_heads: int | None = None, capacity_factor: float | None = None,
                  causal_mask: bool = False) -> int:
  """MoSA heads that fit in the FLOPs a dense layer of `dense_heads` query heads (sharing
  `dense_kv_heads` K/V heads; None: one each, as in the paper) leaves once `kept_dense_heads` dense
  heads (on `kept_kv_heads` K/V heads) are kept. The paper's count (`causal_mask=False`) gives its Tiny
  model (512, 64, 9, 1024, 64, 4) 505 heads; `causal_mask=True` counts as this project's FLOP accounting
  does, where the dense heads' causal attention frees half as much and fewer MoSA heads fit."""
  budget = (dense_head_flops(d_model, head_dim, seq_len, dense_kv_heads, dense_heads, causal_mask)
            - dense_head_flops(d_model, head_dim, seq_len, kept_kv_heads, kept_dense_heads, causal_mask))
  head = mosa_head_flops(d_model, head_dim, seq_len, sparsity, capacity_factor, causal_mask)
  return int(max(0, budget) // head)


def head_slots(seq_len: int, sparsity: int, capacity_factor: float | None = None) -> int:
  """Tokens a MoSA head processes: k = T / rho (the paper), or mosa_causal's capacity of
  `capacity_factor` k slots, computed whether filled or not."""
  if capacity_factor is None:
    return num_selected(seq_len, sparsity)
  return math.ceil(capacity_factor * seq_len / sparsity)


def num_selected(seq_len: int, sparsity: int) -> int:
  """k = T / rho, at least 2 (a head of one token attends only to itself), at most T."""
  return min(seq_len, max(2, seq_len // sparsity))


# ----------------------------------------------------------------------------- slots: gather, attend, scatter

def causal_ranks(taken_BGT: jax.Array, pos_BT: jax.Array, count_BG: jax.Array, *, per_token: float,
                 num_slots: int) -> tuple[jax.Array, jax.Array]:
  """Which taken tokens each group keeps, and their slots, given `count_BG` tokens kept before.

  A group keeps a taken token while it holds fewer than `bound_t = ceil(per_token * (t + 1))` tokens, a
  bound that depends only on the past, so the assignment is causal; kept tokens fill slots 0, 1, ...
  with no gaps (a gap would be an empty slot read by the slots after it). The count after t is
  `K_t = min(K_{t-1} + taken_t, bound_t)` (the bound never falls), in closed form
  `K_t = C_t + min(K_0, min_{s <= t} (bound_s - C_s))` with `C` the running count of taken tokens.
  """
  bound_B1T = jnp.ceil(per_token * (pos_BT + 1).astype(jnp.float32)).astype(jnp.int32)[:, None, :]
  bound_B1T = jnp.minimum(bound_B1T, num_slots)
  c_BGT = jnp.cumsum(taken_BGT, axis=-1, dtype=jnp.int32)
  floor_BGT = jax.lax.cummin(bound_B1T - c_BGT, axis=2)
  k_BGT = c_BGT + jnp.minimum(count_BG[:, :, None], floor_BGT)
  before_BGT = jnp.concatenate([count_BG[:, :, None], k_BGT[:, :, :-1]], axis=-1)
  keep_BGT = taken_BGT & (k_BGT > before_BGT)
  return k_BGT - 1, keep_BGT


def causal_slots(taken_BGT: jax.Array, pos_BT: jax.Array, *, per_token: float, num_slots: int):
  """Slots of each group (head, or head and cluster) for the tokens it keeps (`causal_ranks`), in
  position order. Returns `idx_BGS` (the token in each slot, T where empty) and `keep_BGT`."""
  B, G, T = taken_BGT.shape
  rank_BGT, keep_BGT = causal_ranks(taken_BGT, pos_BT, jnp.zeros((B, G), jnp.int32), per_token=per_token,
                                    num_slots=num_slots)
  slot_BGT = jnp.where(keep_BGT, rank_BGT, num_slots)
  b_B11, g_1G1 = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
  t_BGT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None, :], (B, G, T))
  idx_BGS = jnp.full((B, G, num_slots), T, jnp.int32).at[b_B11, g_1G1, slot_BGT].set(t_BGT, mode='drop')
  return idx_BGS, keep_BGT


def fill_slots(keep_BGT: jax.Array, num_slots: int) -> jax.Array:
  """`[B, G, S]`: the kept tokens of each group in position order, slot by slot (T where empty); kept
  tokens past the last slot are dropped."""
  B, G, T = keep_BGT.shape
  slot_BGT = jnp.where(keep_BGT, jnp.cumsum(keep_BGT, axis=-1, dtype=jnp.int32) - 1, num_slots)
  b_B11, g_1G1 = jnp.arange(B)[:, None, None], jnp.arange(G)[None, :, None]
  t_BGT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None, :], (B, G, T))
  return jnp.full((B, G, num_slots), T, jnp.int32).at[b_B11, g_1G1, slot_BGT].set(t_BGT, mode='drop')


def segment_lengths(seg_BT: jax.Array) -> jax.Array:
  """`[B, T]`: the length of each token's segment (a run of equal ids)."""
  return segment_ends(seg_BT) - segment_starts(seg_BT) + 1


def document_slots(score_BGT: jax.Array, seg_BT: jax.Array, k_BT: jax.Array, num_slots: int):
  """Expert choice per document: each group keeps, of every segment, the `k_BT` (given per token, for
  its segment) tokens of highest score, ties to the lower position, as `jax.lax.top_k` over the segment
  alone would; they fill the slots in position order (`fill_slots`). Returns `idx_BGS` and `keep_BGT`."""
  B, G, T = score_BGT.shape
  start_BGT = jnp.broadcast_to(segment_starts(seg_BT)[:, None, :], (B, G, T))
  order_BGT = jnp.lexsort((-score_BGT, start_BGT), axis=-1)  # by segment, then score; stable
  place_BGT = jnp.argsort(order_BGT, axis=-1).astype(jnp.int32)  # each token's place in that order
  keep_BGT = place_BGT - start_BGT < k_BT[:, None, :]
  return fill_slots(keep_BGT, num_slots), keep_BGT


def _segmented_cummin(x_BGT: jax.Array, first_BT: jax.Array) -> jax.Array:
  """Running minimum along the last axis, restarting where `first_BT` is set."""
  def combine(a, b):
    (fa, xa), (fb, xb) = a, b
    return fa | fb, jnp.where(fb, xb, jnp.minimum(xa, xb))
  first_BGT = jnp.broadcast_to(first_BT[:, None, :], x_BGT.shape)
  return jax.lax.associative_scan(combine, (first_BGT, x_BGT), axis=2)[1]


def document_causal_keep(taken_BGT: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array, *,
                         per_token: float) -> jax.Array:
  """`causal_ranks`' rule per document: the count of kept tokens and its bound restart at each segment
  (positions restart there too), so a document keeps what it keeps alone."""
  T = taken_BGT.shape[-1]
  first_BT = jnp.arange(T)[None, :] == segment_starts(seg_BT)
  bound_B1T = jnp.ceil(per_token * (pos_BT + 1).astype(jnp.float32)).astype(jnp.int32)[:, None, :]
  total_BGT = jnp.cumsum(taken_BGT, axis=-1, dtype=jnp.int32)
  before_start_BGT = _segmented_cummin(jnp.where(first_BT[:, None, :], total_BGT - taken_BGT, T), first_BT)
  c_BGT = total_BGT - before_start_BGT  # taken tokens of the segment so far
  k_BGT = c_BGT + jnp.minimum(0, _segmented_cummin(bound_B1T - c_BGT, first_BT))
  previous_BGT = jnp.concatenate([jnp.zeros_like(k_BGT[..., :1]), k_BGT[..., :-1]], axis=-1)
  previous_BGT = jnp.where(first_BT[:, None, :], 0, previous_BGT)
  return taken_BGT & (k_BGT > previous_BGT)


def slot_segments(seg_BT: jax.Array, idx_BGS: jax.Array) -> jax.Array:
  """`[B, G, S]`: the segment of each slot's token; -1 for empty slots (one run at the end)."""
  T = seg_BT.shape[1]
  seg_BGS = seg_BT[jnp.arange(seg_BT.shape[0])[:, None, None], jnp.minimum(idx_BGS, T - 1)]
  return jnp.where(idx_BGS < T, seg_BGS, -1)


def dropped_share(wanted_BGT: jax.Array, idx_BGS: jax.Array) -> jax.Array:
  """The share of the tokens a document packing wanted in slots that did not fit."""
  T = wanted_BGT.shape[-1]
  placed = jnp.sum(idx_BGS < T)
  return 1 - placed / jnp.maximum(jnp.sum(wanted_BGT), 1)


def gather_slots(x_BTX: jax.Array, idx_BGS: jax.Array) -> jax.Array:
  """`[B, G, S, X]`: the token of each slot (empty slots read the last token; their outputs drop)."""
  T = x_BTX.shape[1]
  return x_BTX[jnp.arange(x_BTX.shape[0])[:, None, None], jnp.minimum(idx_BGS, T - 1)]


def scatter_slots(y_BGSX: jax.Array, idx_BGS: jax.Array, seq_len: int) -> jax.Array:
  """`[B, T, X]`: each slot's row added at its token (empty slots, index T, are dropped)."""
  B = y_BGSX.shape[0]
  out_BTX = jnp.zeros((B, seq_len) + y_BGSX.shape[3:], y_BGSX.dtype)
  return out_BTX.at[jnp.arange(B)[:, None, None], idx_BGS].add(y_BGSX, mode='drop')


def slot_cache(layer: dense.Attention, batch: int, max_len: int, slots: int, groups: int,
               head_dim: int) -> Cache:
  """The decoding cache of a layer of dense heads beside slot-attention groups (mosa_causal's heads,
  routing_causal's clusters): the dense heads' K/V, each group's slot K/V and its count of kept tokens."""
  shape = (batch, slots, groups, head_dim)
  return {'dense': dense.Attention.init_cache(layer, batch, max_len), 'k': jnp.zeros(shape, layer.dtype),
          'v': jnp.zeros(shape, layer.dtype), 'count': jnp.zeros((batch, groups), jnp.int32)}


def slot_attention(q_BSGD: jax.Array, k_BSGD: jax.Array, v_BSGD: jax.Array, *, kernel: str,
                   window: int | None = None, seg_BGS: jax.Array | None = None,
                   local: bool = False) -> jax.Array:
  """Causal attention over each group's slots; slots are in position order, so slot order is position
  order, and empty slots come last, where no filled slot sees them. `seg_BGS`: the slots' segments
  (`slot_segments`), which differ between groups, so the groups then run as rows of their own. `local`:
  already on one device's share (under `shard_map`, context parallelism), the kernel called as it is."""
  attend = functools.partial(flash_attention, causal=True, window=window, implementation=kernel)
  place = (lambda fn, *args: fn(*args)) if local else sharding.attention_per_device
  if seg_BGS is None:
    return place(attend, q_BSGD, k_BSGD, v_BSGD)
  B, S, G, D = q_BSGD.shape
  def rows(x_BSGD):
    return x_BSGD.transpose(0, 2, 1, 3).reshape(B * G, S, 1, D)
  o_XS1D = place(lambda q, k, v, seg: attend(q, k, v, segment_ids=seg),
                 rows(q_BSGD), rows(k_BSGD), rows(v_BSGD), seg_BGS.reshape(B * G, S))
  return o_XS1D.reshape(B, G, S, D).transpose(0, 2, 1, 3)


def cached_slot_attention(q_BTGD, k_BTGD, v_BTGD, rank_BTG, keep_BTG, cache: Cache, *,
                          window: int | None = None):
  """Decoding: writes the kept new tokens into their groups' slots, then each attends to the slots at
  or before its own (within `window`). Returns the outputs (zero where not kept) and the cache."""
  B, T, G, _ = q_BTGD.shape
  S = cache['k'].shape[1]
  slot_BTG = jnp.where(keep_BTG, rank_BTG, S)
  b_B11, g_11G = jnp.arange(B)[:, None, None], jnp.arange(G)[None, None, :]
  k_BSGD = cache['k'].at[b_B11, slot_BTG, g_11G].set(k_BTGD.astype(cache['k'].dtype), mode='drop')
  v_BSGD = cache['v'].at[b_B11, slot_BTG, g_11G].set(v_BTGD.astype(cache['v'].dtype), mode='drop')
  s_BGTS = jnp.einsum('btgd,bsgd->bgts', q_BTGD, k_BSGD,
                      preferred_element_type=jnp.float32) * q_BTGD.shape[-1] ** -0.5
  slot_111S = jnp.arange(S)[None, None, None, :]
  rank_BGT1 = rank_BTG.transpose(0, 2, 1)[..., None]
  mask_BGTS = slot_111S <= rank_BGT1
  if window:
    mask_BGTS &= slot_111S > rank_BGT1 - window
  p_BGTS = jax.nn.softmax(jnp.where(mask_BGTS, s_BGTS, MASK_VALUE), axis=-1)
  o_BTGD = jnp.einsum('bgts,bsgd->btgd', p_BGTS.astype(v_BSGD.dtype), v_BSGD)
  o_BTGD = o_BTGD * keep_BTG[..., None].astype(o_BTGD.dtype)
  count_BG = cache['count'] + jnp.sum(keep_BTG, axis=1, dtype=jnp.int32)
  return o_BTGD, {'k': k_BSGD, 'v': v_BSGD, 'count': count_BG}


# ----------------------------------------------------------------------------- the layer

class Threshold(nnx.Variable):
  """mosa_causal's per-head router threshold: state the train step moves, never a gradient."""


class Attention(dense.Attention):
  """The paper's MoSA: expert-choice top-k over the whole sequence, hence not causal."""

  context_parallel = True  # the choice from logits in natural order, slots split by head (context.py)
  segments = True
  causal = False
  # MoSA heads come beside the few dense heads kept, which need not span d_model (the paper's Tiny
  # model keeps 4 dense heads of 64 in a width of 512).
  heads_span_width = False
  decodes = False

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    d, m, dh, pd = cfg.d_model, cfg.mosa.num_heads, cfg.head_dim, cfg.param_dtype
    self.mosa_router = param(rngs, (d, m), ('embed', 'q_heads'), stddev=d**-0.5, dtype=pd)
    for name in ('mosa_wq', 'mosa_wk', 'mosa_wv'):
      setattr(self, name, param(rngs, (d, m, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5,
                                dtype=pd))
    # Each token meets few MoSA heads, so the output starts at the dense heads' scale per head.
    self.mosa_wo = param(rngs, (m, dh, d), ('q_heads', 'head_dim', 'embed'),
                         stddev=output_stddev(cfg.num_heads * dh, cfg.num_layers), dtype=pd)
    self.mosa = ml_collections.FrozenConfigDict(cfg.mosa)

  @staticmethod
  def defaults() -> dict:
    m = ml_collections.ConfigDict()  # MoSA heads beside model.num_heads dense heads
    m.num_heads = 8  # MoSA heads per layer (mosa.isoflop_heads gives the paper's isoFLOP count)
    m.sparsity = 4  # rho: a MoSA head takes k = T / rho tokens (at least 2)
    m.include_first = False  # every MoSA head always takes the first token
    m.capacity_factor = 2.0  # mosa_causal: a head's slots, as a multiple of T / rho
    m.threshold_rate = 0.01  # mosa_causal: step of the router threshold toward share 1 / rho
    return {'mosa': m}

  @staticmethod
  def tiny_config() -> dict:
    return {'mosa': {'num_heads': 6, 'sparsity': 4, 'include_first': True}}

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    m = cfg.mosa
    require_positive(m, 'model.mosa', ('num_heads',))
    require_positive(m, 'model.mosa', ('sparsity',), ' (rho: k = T / rho)')
    if not m.capacity_factor >= 1:
      raise ConfigError(f'model.mosa.capacity_factor={m.capacity_factor} must be at least 1')
    if not m.threshold_rate >= 0:
      raise ConfigError(f'model.mosa.threshold_rate={m.threshold_rate} must be >= 0 (0: fixed thresholds)')

  @staticmethod
  def capacity_factor(cfg: ml_collections.ConfigDict) -> float | None:
    """None: the paper's head computes exactly its k tokens (`head_slots`)."""
    del cfg
    return None

  @classmethod
  def attended_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """The dense heads' keys, plus the MoSA heads' work in units of a dense head: S slots a head (k, or
    mosa_causal's capacity), each seeing (S + 1) / 2 keys on average, spread over T tokens."""
    s = head_slots(seq_len, cfg.mosa.sparsity, cls.capacity_factor(cfg))
    sparse = cfg.mosa.num_heads * s * (s + 1) / 2 / seq_len
    return super().attended_keys(cfg, seq_len) + sparse / cfg.num_heads

  @classmethod
  def param_uses_per_token(cls, cfg: ml_collections.ConfigDict) -> dict[str, float]:
    # A MoSA head projects only its slots (k = T / rho, or the causal capacity); the router scores
    # every token.
    share = (cls.capacity_factor(cfg) or 1) / cfg.mosa.sparsity
    return {name: share for name in ('mosa_wq', 'mosa_wk', 'mosa_wv', 'mosa_wo')}

  def init_cache(self, batch: int, max_len: int) -> Cache:
    raise ValueError('model.attention=mosa chooses tokens by a top-k over the whole sequence and cannot '
                     'decode token by token; use mosa_causal')

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    del update_state  # the paper's top-k keeps no state
    if cache is not None:
      raise ValueError('model.attention=mosa cannot decode with a cache; use mosa_causal')
    y_BTD, _ = super().__call__(x_BTD, pos_BT, seg_BT)
    return y_BTD + self._mosa_heads(x_BTD.astype(self.dtype), pos_BT, seg_BT), None

  def _mosa_heads(self, x_BTD, pos_BT, seg_BT, update_state: bool = False) -> jax.Array:
    """The MoSA heads' output over a whole sequence: the choice, then the slots. Under `mesh.context`
    (zigzag-ordered tokens, sparse_lm/context.py) the choice is made from the logits in the row's
    natural order, the one device's choice, and the slots run split by head (`_sparse_heads_split`)."""
    logits_BMT = self._router_logits(x_BTD)
    C = context.size()
    if C > 1:
      logits_BMT = context.restore(logits_BMT.transpose(0, 2, 1), C).transpose(0, 2, 1)
      pos_BT = context.restore(pos_BT, C)
      seg_BT = None if seg_BT is None else context.restore(seg_BT, C)
    idx_BMS = (self._select(logits_BMT, pos_BT, update_state) if seg_BT is None else
               self._select_per_document(logits_BMT, pos_BT, seg_BT, update_state))
    if C > 1:
      return self._sparse_heads_split(x_BTD, pos_BT, logits_BMT, idx_BMS, seg_BT, C)
    return self._sparse_heads(x_BTD, pos_BT, logits_BMT, idx_BMS, seg_BT)

  def _document_slots(self, seq_len: int) -> int:
    """Slots a head runs on a packed row: twice its own (per-document rounding), at most T."""
    capacity = self.mosa.capacity_factor if self.causal else None  # as `capacity_factor` says
    return min(seq_len, 2 * head_slots(seq_len, self.mosa.sparsity, capacity))

  def _select_per_document(self, logits_BMT, pos_BT, seg_BT, update_state: bool = False) -> jax.Array:
    """Expert choice within each document: `k(n)` of each document of n tokens (`document_slots`)."""
    del update_state  # the paper's top-k keeps no state
    score_BMT = logits_BMT
    if self.mosa.include_first:
      score_BMT = jnp.where((pos_BT == 0)[:, None, :], jnp.inf, score_BMT)
    n_BT = segment_lengths(seg_BT)
    k_BT = jnp.minimum(n_BT, jnp.maximum(2, n_BT // self.mosa.sparsity))
    idx_BMS, keep_BMT = document_slots(jax.lax.stop_gradient(score_BMT), seg_BT, k_BT,
                                       self._document_slots(logits_BMT.shape[-1]))
    self.sow(nnx.Intermediate, 'mosa_dropped_share', dropped_share(keep_BMT, idx_BMS))
    return idx_BMS

  def _router_logits(self, x_BTD):
    return jnp.einsum('btd,dm->bmt', x_BTD, self.mosa_router[...].astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def _select(self, logits_BMT, pos_BT, update_state: bool = False) -> jax.Array:
    """Expert choice: each head's top-k tokens, sorted by position."""
    del update_state
    score_BMT = logits_BMT
    if self.mosa.include_first:
      score_BMT = jnp.where((pos_BT == 0)[:, None, :], jnp.inf, score_BMT)
    k = num_selected(logits_BMT.shape[-1], self.mosa.sparsity)
    _, idx_BMS = jax.lax.top_k(jax.lax.stop_gradient(score_BMT), k)
    return jnp.sort(idx_BMS, axis=-1).astype(jnp.int32)

  def _project(self, x_BTD, pos_BTM):
    """Every head's Q/K/V of every token, `[B, T, M, D]` (decoding); RoPE at their positions."""
    q, k, v = (jnp.einsum('btd,dmh->btmh', x_BTD, w) for w in self._weights()[:3])
    return self._rope(q, pos_BTM), self._rope(k, pos_BTM), v

  def _rope(self, x_BSMD, pos_BSM):
    """RoPE with a position per (slot, head): heads are folded into the batch."""
    B, S, M, D = x_BSMD.shape
    x_XS1D = x_BSMD.transpose(0, 2, 1, 3).reshape(B * M, S, 1, D)
    pos_XS = pos_BSM.transpose(0, 2, 1).reshape(B * M, S)
    return rope(x_XS1D, pos_XS, self.rope_theta).reshape(B, M, S, D).transpose(0, 2, 1, 3)

  def _slot_inputs(self, pos_BT, logits_BMT, idx_BMS, seg_BT):
    """Per slot: its token's position, its router gate `r_t` and (under documents) its segment."""
    T = pos_BT.shape[1]
    pos_BMS = gather_slots(pos_BT[..., None], idx_BMS)[..., 0]
    r_BMS = jax.nn.sigmoid(jnp.take_along_axis(logits_BMT, jnp.minimum(idx_BMS, T - 1), axis=-1))
    return pos_BMS, r_BMS, None if seg_BT is None else slot_segments(seg_BT, idx_BMS)

  def _weights(self) -> tuple[jax.Array, ...]:
    return tuple(w[...].astype(self.dtype) for w in (self.mosa_wq, self.mosa_wk, self.mosa_wv, self.mosa_wo))

  def _slot_outputs(self, x_BMSD, pos_BMS, r_BMS, seg_BMS, wq, wk, wv, wo, *, local: bool = False):
    """The heads' slots, `[B, M, S, D]` rows at positions `pos_BMS`, projected, attended among
    themselves and projected back, scaled by their gates."""
    q_BSMD, k_BSMD, v_BSMD = (jnp.einsum('bmsd,dmh->bsmh', x_BMSD, w) for w in (wq, wk, wv))
    pos_BSM = pos_BMS.transpose(0, 2, 1)
    o_BSMD = slot_attention(self._rope(q_BSMD, pos_BSM), self._rope(k_BSMD, pos_BSM), v_BSMD,
                            kernel=self.kernel, seg_BGS=seg_BMS, local=local)
    return jnp.einsum('bsmh,mhd->bmsd', o_BSMD, wo) * r_BMS[..., None].astype(self.dtype)

  def _sparse_heads(self, x_BTD, pos_BT, logits_BMT, idx_BMS, seg_BT=None) -> jax.Array:
    y_BMSD = self._slot_outputs(gather_slots(x_BTD, idx_BMS), *self._slot_inputs(pos_BT, logits_BMT, idx_BMS,
                                                                                  seg_BT), *self._weights())
    return scatter_slots(y_BMSD, idx_BMS, x_BTD.shape[1])

  def _sparse_heads_split(self, x_BTD, pos_BT, logits_BMT, idx_BMS, seg_BT, C: int) -> jax.Array:
    """`_sparse_heads` with `x_BTD` zigzag-ordered and split over the context axis; `pos_BT`, `seg_BT`,
    the logits and the chosen slots `idx_BMS` in natural order (sparse_lm/context.py, "slots"): each
    device runs every slot of its 1/C of the heads (heads padded to a multiple of C)."""
    T = x_BTD.shape[1]
    pos_BMS, r_BMS, seg_BMS = self._slot_inputs(pos_BT, logits_BMT, idx_BMS, seg_BT)
    slot_args = (context.pad_groups(pos_BMS, C, 1), context.pad_groups(r_BMS, C, 1))
    if seg_BMS is not None:
      slot_args += (context.pad_groups(seg_BMS, C, 1, -1),)
    wq, wk, wv, wo = self._weights()
    weights = tuple(context.pad_groups(w, C, 1) for w in (wq, wk, wv)) + (context.pad_groups(wo, C, 0),)

    def share(x_BLD, zz_BMS, pos_BMS, r_BMS, *rest):
      seg_BMS = rest[0] if len(rest) == 5 else None
      L = x_BLD.shape[1]
      mine_BMS, row_BMS = context.own_slots(zz_BMS, L)
      x_BmSD = context.slot_groups(jnp.where(mine_BMS[..., None], gather_slots(x_BLD, row_BMS), 0), C)
      mine = functools.partial(context.my_groups, C=C)
      wq, wk, wv, wo = rest[-4:]
      y_BmSD = self._slot_outputs(x_BmSD, mine(pos_BMS, axis=1), mine(r_BMS, axis=1),
                                  None if seg_BMS is None else mine(seg_BMS, axis=1),
                                  mine(wq, axis=1), mine(wk, axis=1), mine(wv, axis=1), mine(wo, axis=0),
                                  local=True)
      return scatter_slots(context.groups_slots(y_BmSD), row_BMS, L)
    zz_BMS = context.pad_groups(context.split_index(idx_BMS, T, C), C, 1, T)
    return context.per_share(share, x_BTD, rows=(zz_BMS, *slot_args), replicated=weights,
                             out_shape=jax.ShapeDtypeStruct(x_BTD.shape, x_BTD.dtype))


class CausalAttention(Attention):
  """mosa_causal: a head takes token t iff its router logit exceeds a threshold tracked toward the target
  share 1 / rho, so the choice of t never looks past t; decodes with a cache."""

  causal = True
  decodes = True

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    # The router logits start about standard normal (unit-RMS input, d^-1/2 weights): start each
    # threshold at the quantile that leaves 1 / rho of them above it.
    share = 1 / cfg.mosa.sparsity
    start = statistics.NormalDist().inv_cdf(1 - share) if share < 1 else -10.0
    self.threshold = Threshold(jnp.full((cfg.mosa.num_heads,), start, jnp.float32))

  @staticmethod
  def capacity_factor(cfg: ml_collections.ConfigDict) -> float:
    """Every one of a head's capacity slots is projected and attended, filled or not."""
    return cfg.mosa.capacity_factor

  def _slots(self, seq_len: int) -> int:
    return head_slots(seq_len, self.mosa.sparsity, self.mosa.capacity_factor)

  def _taken(self, logits_BMT, pos_BT, update_state: bool) -> jax.Array:
    """Which tokens each head takes; `update_state` (the train step) moves the thresholds."""
    tau_1M1 = jax.lax.stop_gradient(self.threshold[...])[None, :, None]
    taken_BMT = logits_BMT > tau_1M1
    if self.mosa.include_first:
      taken_BMT |= (pos_BT == 0)[:, None, :]
    self.sow(nnx.Intermediate, 'mosa_taken_share', jnp.mean(taken_BMT.astype(jnp.float32)))
    if update_state:
      share_M = jnp.mean(taken_BMT.astype(jnp.float32), axis=(0, 2))
      self.threshold[...] = self.threshold[...] + self.mosa.threshold_rate * (
          share_M - 1 / self.mosa.sparsity) * self.mosa.sparsity
    return taken_BMT

  def _select(self, logits_BMT, pos_BT, update_state: bool = False) -> jax.Array:
    m = self.mosa
    idx_BMS, _ = causal_slots(self._taken(logits_BMT, pos_BT, update_state), pos_BT,
                                 per_token=m.capacity_factor / m.sparsity,
                                 num_slots=self._slots(logits_BMT.shape[-1]))
    return idx_BMS

  def _select_per_document(self, logits_BMT, pos_BT, seg_BT, update_state: bool = False) -> jax.Array:
    m = self.mosa
    keep_BMT = document_causal_keep(self._taken(logits_BMT, pos_BT, update_state), pos_BT, seg_BT,
                                    per_token=m.capacity_factor / m.sparsity)
    idx_BMS = fill_slots(keep_BMT, self._document_slots(logits_BMT.shape[-1]))
    self.sow(nnx.Intermediate, 'mosa_dropped_share', dropped_share(keep_BMT, idx_BMS))
    return idx_BMS

  def init_cache(self, batch: int, max_len: int) -> Cache:
    return slot_cache(self, batch, max_len, self._slots(max_len), self.mosa.num_heads, self.mosa_wk.shape[-1])

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    if cache is None:
      y_BTD, _ = dense.Attention.__call__(self, x_BTD, pos_BT, seg_BT)
      return y_BTD + self._mosa_heads(x_BTD.astype(self.dtype), pos_BT, seg_BT, update_state), None
    y_BTD, dense_cache = dense.Attention.__call__(self, x_BTD, pos_BT, cache=cache['dense'])
    x_BTD = x_BTD.astype(self.dtype)
    logits_BMT = self._router_logits(x_BTD)
    m, S = self.mosa, cache['k'].shape[1]
    taken_BMT = self._taken(logits_BMT, pos_BT, update_state)
    rank_BMT, keep_BMT = causal_ranks(taken_BMT, pos_BT, cache['count'],
                                      per_token=m.capacity_factor / m.sparsity, num_slots=S)
    pos_BTM = jnp.broadcast_to(pos_BT[..., None], pos_BT.shape + (m.num_heads,))
    q_BTMD, k_BTMD, v_BTMD = self._project(x_BTD, pos_BTM)
    o_BTMD, sparse_cache = cached_slot_attention(
        q_BTMD, k_BTMD, v_BTMD, rank_BMT.transpose(0, 2, 1), keep_BMT.transpose(0, 2, 1),
        {'k': cache['k'], 'v': cache['v'], 'count': cache['count']})
    r_BTM = jax.nn.sigmoid(logits_BMT).transpose(0, 2, 1).astype(self.dtype)
    y_BTD += jnp.einsum('btmh,mhd->btd', o_BTMD * r_BTM[..., None], self.mosa_wo[...].astype(self.dtype))
    return y_BTD, {'dense': dense_cache, **sparse_cache}
