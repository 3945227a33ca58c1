"""Routing attention (Roy, Saffar, Vaswani & Grangier 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL, arXiv:2003.05997).

A layer is `model.num_heads` local heads (sliding window `model.routing.window`) beside
`model.routing.num_heads` routing heads. A routing head r:
- projects every token once to a shared query/key vector (the paper's language-model setting) and a
  value, and normalises the query/key to the unit sphere;
- keeps `C` centroids on that sphere, updated by an exponential moving average of the vectors nearest
  to each (mini-batch k-means), never by gradient; a commitment loss pulls the vectors toward their
  centroid (sown as an `AuxLoss`, added to the training loss);
- forms balanced clusters: each centroid takes its `T / C` nearest tokens (top-k), sorted by position;
- attends within each cluster under the original-position causal mask (sorted, the ordinary causal
  mask over the cluster's slots, so `pallas_kernels.flash_attention` serves); a token in several
  clusters gets the average of its outputs, a token in none gets zero from this head.

Where this departs from the paper, and why:
- Positions enter through rotary embeddings on the shared query/key (after routing, which sees the
  un-rotated vectors), the project's one position scheme, instead of the paper's relative encodings.
- The shared query/key makes a token's own key its best match; the logits are the cosine times
  `sqrt(head_dim)`, as scaled dot products of vectors of norm `sqrt(head_dim)`.

Causality. A centroid's top-k looks at the whole sequence, so which cluster sees a token depends on later
tokens: `Attention` (`routing`) is the faithful version, flagged `causal = False`. `CausalAttention`
(`routing_causal`) assigns each token to its nearest centroid (the centroids are state, fixed during a
pass), lays each cluster's tokens out in position order (sorted, chunked clusters) and lets a token see
the last `window` tokens of its own cluster before it. A token whose rank in its cluster reaches
`capacity_factor * (t + 1) / C` is dropped (zero from this head), a rule that only looks back. It decodes
with a cache of each cluster's keys and values.

Documents in a packed row (`seg_BT`): the local heads keep to the document by segment ids; a centroid
takes, of each document of n tokens, its `max(1, n // C)` nearest (`routing`), or a document's tokens are
kept by the capacity rule counted from the document's start (`routing_causal`), as the document alone
would; the clusters' slots then attend only to slots of their own document. As for MoSA (see mosa.py),
a cluster runs twice its slots under segments for the per-document rounding, and what still does not fit
is dropped and counted (`routing_dropped_share`). A row-wide choice would give a document a share of each
cluster that depends on the other documents in its row.

Context parallelism (`mesh.context`, sparse_lm/context.py, "slots"): the local heads run the window's
ring; the clusters are formed on every device from the centroid scores in the row's natural order
(gathered: C numbers a token and head), the one device's clusters; each device attends every slot of
1/C of the (head, cluster) groups and the outputs return to the devices holding their tokens
(`_routed_split`). The commitment loss and the centroids' EMA are sums over tokens, unchanged.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparse_lm import context
from sparse_lm.attention import dense
from sparse_lm.attention.mosa import (
  cached_slot_attention,
  causal_ranks,
  causal_slots,
  document_causal_keep,
  document_slots,
  dropped_share,
  fill_slots,
  segment_lengths,
  slot_attention,
  slot_cache,
  slot_segments,
)
from sparse_lm.errors import ConfigError, require_positive
from sparse_lm.layers import AuxLoss, output_stddev, param, rope

Cache = dict


class Centroids(nnx.Variable):
  """The k-means centroids of a routing layer, `[heads, C, head_dim]` unit vectors; moved by EMA."""


def _unit(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + 1e-12)).astype(x.dtype)


class Attention(dense.Attention):
  """The paper's routing attention: balanced top-k clusters over the whole sequence, not causal."""

  context_parallel = True  # clusters from scores in natural order, slots split by group (context.py)
  segments = True
  causal = False
  heads_span_width = False  # routing heads come beside the model.num_heads local heads
  decodes = False

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    rt = cfg.routing
    d, R, dh, pd = cfg.d_model, rt.num_heads, cfg.head_dim, cfg.param_dtype
    self.routing_wqk = param(rngs, (d, R, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.routing_wv = param(rngs, (d, R, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.routing_wo = param(rngs, (R, dh, d), ('q_heads', 'head_dim', 'embed'),
                            stddev=output_stddev((cfg.num_heads + R) * dh, cfg.num_layers), dtype=pd)
    self.centroids = Centroids(_unit(jax.random.normal(rngs.params(), (R, rt.num_clusters, dh))))
    self.routing = ml_collections.FrozenConfigDict(rt)

  # ------------------------------------------------------------------------- config and FLOPs

  @staticmethod
  def attention_window(cfg: ml_collections.ConfigDict) -> int:
    if not isinstance(cfg.routing.window, int) or cfg.routing.window < 1:
      raise ConfigError(f'model.routing.window={cfg.routing.window!r}: the local heads need a window >= 1')
    return cfg.routing.window

  @staticmethod
  def defaults() -> dict:
    rt = ml_collections.ConfigDict()  # routing heads beside model.num_heads local heads
    rt.num_heads = 2  # routing heads per layer
    rt.num_clusters = 4  # C: centroids per head; balanced clusters of T / C tokens
    rt.window = 32  # the local heads' window; routing_causal: keys seen within a cluster
    rt.decay = 0.999  # EMA rate of the centroids (the paper's lambda)
    rt.commitment_weight = 1e-3  # commitment loss, added to the training loss
    rt.capacity_factor = 2.0  # routing_causal: a cluster's slots, as a multiple of T / C
    return {'routing': rt}

  @staticmethod
  def tiny_config() -> dict:
    return {'routing': {'num_heads': 2, 'num_clusters': 4, 'window': 6}}

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    rt = cfg.routing
    cls.attention_window(cfg)
    require_positive(rt, 'model.routing', ('num_heads', 'num_clusters'))
    if not 0 <= rt.decay < 1:
      raise ConfigError(f'model.routing.decay={rt.decay} must be in [0, 1) (EMA of the centroids)')
    if not rt.capacity_factor >= 1:
      raise ConfigError(f'model.routing.capacity_factor={rt.capacity_factor} must be at least 1')
    if not rt.commitment_weight >= 0:
      raise ConfigError(f'model.routing.commitment_weight={rt.commitment_weight} must be >= 0')

  @staticmethod
  def cluster_slots(cfg: ml_collections.ConfigDict, seq_len: int) -> tuple[int, int]:
    """(slots a cluster runs, keys a slot sees at most): balanced clusters of w = T / C, causal within."""
    w = max(1, seq_len // cfg.routing.num_clusters)
    return w, w

  @classmethod
  def routed_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Keys per token of a routing head: every slot of the C clusters attends causally within its
    cluster (up to the window), padding slots included, over T tokens; plus scoring each token against
    the C centroids, 2 h' FLOPs a centroid where a key costs 4 h', so C / 2 keys."""
    slots, span = cls.cluster_slots(cfg, seq_len)
    C = cfg.routing.num_clusters
    return C * sum(min(i + 1, span) for i in range(slots)) / seq_len + C / 2

  @classmethod
  def attended_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """The local heads' keys plus the routing heads' keys, in units of a local head."""
    routed = cfg.routing.num_heads * cls.routed_keys(cfg, seq_len)
    return super().attended_keys(cfg, seq_len) + routed / cfg.num_heads

  def init_cache(self, batch: int, max_len: int) -> Cache:
    raise ValueError('model.attention=routing clusters by a top-k over the whole sequence and cannot '
                     'decode token by token; use routing_causal')

  # ------------------------------------------------------------------------- forward

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    if cache is not None:
      raise ValueError('model.attention=routing cannot decode with a cache; use routing_causal')
    y_BTD, _ = dense.Attention.__call__(self, x_BTD, pos_BT, seg_BT)
    return y_BTD + self._routing_heads(x_BTD, pos_BT, seg_BT, update_state), None

  def _routing_heads(self, x_BTD, pos_BT, seg_BT, update_state: bool) -> jax.Array:
    """The routing heads' output over a whole sequence. Under `mesh.context` (zigzag-ordered tokens,
    sparse_lm/context.py) the clusters are formed from the centroid scores in the row's natural order,
    the one device's clusters, and their slots run split by group (`_routed_split`)."""
    qk_BTRD, v_BTRD, score_BRCT = self._route_inputs(x_BTD, update_state)
    C = context.size()
    if C > 1:
      score_BRCT = context.restore(score_BRCT.transpose(0, 3, 1, 2), C).transpose(0, 2, 3, 1)
      pos_BT = context.restore(pos_BT, C)
      seg_BT = None if seg_BT is None else context.restore(seg_BT, C)
    idx_BGS = (self._clusters(score_BRCT, pos_BT) if seg_BT is None else
               self._document_clusters(score_BRCT, pos_BT, seg_BT))
    if C > 1:
      o_BTRD = self._routed_split(qk_BTRD, v_BTRD, pos_BT, idx_BGS, seg_BT, C)
    else:
      o_BTRD = self._routed(qk_BTRD, v_BTRD, pos_BT, idx_BGS, seg_BT)
    return jnp.einsum('btrh,rhd->btd', o_BTRD, self.routing_wo[...].astype(self.dtype))

  def _route_inputs(self, x_BTD, update_state: bool = False):
    """Unit query/keys, values and the scores against the centroids; sows the commitment loss and, with
    `update_state` (the train step), moves the centroids."""
    x_BTD = x_BTD.astype(self.dtype)
    qk_BTRD = _unit(jnp.einsum('btd,drh->btrh', x_BTD, self.routing_wqk[...].astype(self.dtype)))
    v_BTRD = jnp.einsum('btd,drh->btrh', x_BTD, self.routing_wv[...].astype(self.dtype))
    mu_RCD = jax.lax.stop_gradient(self.centroids[...])
    score_BRCT = jnp.einsum('btrh,rch->brct', qk_BTRD, mu_RCD.astype(self.dtype),
                            preferred_element_type=jnp.float32)
    nearest_BTRC = jax.nn.one_hot(jnp.argmax(score_BRCT, axis=2).transpose(0, 2, 1),
                                  mu_RCD.shape[1], dtype=jnp.float32)
    # Commitment loss (as in VQ-VAE, van den Oord et al. 2017): the distance to the nearest centroid.
    near_BTRD = jnp.einsum('btrc,rch->btrh', nearest_BTRC, mu_RCD)
    commit = jnp.mean(jnp.sum((qk_BTRD.astype(jnp.float32) - near_BTRD) ** 2, axis=-1))
    self.sow(AuxLoss, 'routing_commitment_aux_loss', self.routing.commitment_weight * commit)
    if update_state:
      self._ema_step(jax.lax.stop_gradient(qk_BTRD.astype(jnp.float32)), nearest_BTRC)
    return qk_BTRD, v_BTRD, score_BRCT

  def _ema_step(self, qk_BTRD, nearest_BTRC) -> None:
    """Mini-batch k-means by EMA (Roy et al. Sec. 4.1): each centroid moves toward the mean of the
    vectors nearest to it, then back onto the sphere; a centroid nothing chose stays."""
    sum_RCD = jnp.einsum('btrc,btrh->rch', nearest_BTRC, qk_BTRD)
    count_RC1 = jnp.sum(nearest_BTRC, axis=(0, 1))[..., None]
    mu_RCD = self.centroids[...]
    decay = self.routing.decay
    moved_RCD = _unit(decay * mu_RCD + (1 - decay) * sum_RCD / jnp.maximum(count_RC1, 1.0))
    self.centroids[...] = jnp.where(count_RC1 > 0, moved_RCD, mu_RCD)

  def _clusters(self, score_BRCT, pos_BT) -> jax.Array:
    """Balanced clusters: each centroid's T / C best tokens, sorted by position; `[B, R*C, w]`."""
    B, R, C, T = score_BRCT.shape
    _, idx_BRCw = jax.lax.top_k(score_BRCT, max(1, T // C))
    return jnp.sort(idx_BRCw, axis=-1).astype(jnp.int32).reshape(B, R * C, -1)

  def _document_clusters(self, score_BRCT, pos_BT, seg_BT) -> jax.Array:
    """Balanced clusters per document: each centroid's `max(1, n // C)` best tokens of each document."""
    del pos_BT
    B, R, C, T = score_BRCT.shape
    n_BT = segment_lengths(seg_BT)
    score_BGT = jax.lax.stop_gradient(score_BRCT).reshape(B, R * C, T)
    idx_BGS, keep_BGT = document_slots(score_BGT, seg_BT, jnp.maximum(1, n_BT // C),
                                       min(T, 2 * max(1, T // C)))
    self.sow(nnx.Intermediate, 'routing_dropped_share', dropped_share(keep_BGT, idx_BGS))
    return idx_BGS

  def _window(self) -> int | None:
    return None

  def _routed(self, qk_BTRD, v_BTRD, pos_BT, idx_BGS, seg_BT=None) -> jax.Array:
    """Attention within each group's slots (group g = head g // C, cluster g % C), outputs averaged over
    the groups that took a token: `[B, T, R, D]`."""
    B, T, R, _ = qk_BTRD.shape
    heads_1G1 = _heads(idx_BGS.shape[1], R)[None, :, None]
    b_B11, tok_BGS = jnp.arange(B)[:, None, None], jnp.minimum(idx_BGS, T - 1)
    seg_BGS = None if seg_BT is None else slot_segments(seg_BT, idx_BGS)
    o_BGSD = self._attend_slots(qk_BTRD[b_B11, tok_BGS, heads_1G1], v_BTRD[b_B11, tok_BGS, heads_1G1],
                                pos_BT[b_B11, tok_BGS], seg_BGS)
    return _averaged(o_BGSD, idx_BGS, heads_1G1, T, R)

  def _attend_slots(self, qk_BGSD, v_BGSD, pos_BGS, seg_BGS, *, local: bool = False) -> jax.Array:
    """Each group's slots attending among themselves (the shared query/key rotated at the slots'
    positions): `[B, G, S, D]`."""
    qk_BSGD = self._rope(qk_BGSD * qk_BGSD.shape[-1]**0.5, pos_BGS)
    return slot_attention(qk_BSGD, qk_BSGD, v_BGSD.transpose(0, 2, 1, 3), kernel=self.kernel,
                          window=self._window(), seg_BGS=seg_BGS, local=local).transpose(0, 2, 1, 3)

  def _routed_split(self, qk_BTRD, v_BTRD, pos_BT, idx_BGS, seg_BT, C: int) -> jax.Array:
    """`_routed` with `qk_BTRD` and `v_BTRD` zigzag-ordered and split over the context axis; `pos_BT`,
    `seg_BT` and the clusters' slots `idx_BGS` in natural order (sparse_lm/context.py, "slots"): each
    device runs every slot of its 1/C of the groups (padded to a multiple of C)."""
    B, T, R, D = qk_BTRD.shape
    G = idx_BGS.shape[1]
    heads_G = _heads(G, R)
    slot_args = (context.pad_groups(pos_BT[jnp.arange(B)[:, None, None], jnp.minimum(idx_BGS, T - 1)], C, 1),)
    if seg_BT is not None:
      slot_args += (context.pad_groups(slot_segments(seg_BT, idx_BGS), C, 1, -1),)

    def share(qkv_BLRX, zz_BGS, pos_BGS, *seg):
      L = qkv_BLRX.shape[1]
      mine_BGS, row_BGS = context.own_slots(zz_BGS, L)
      heads_1G1 = context.pad_groups(heads_G, C, 0)[None, :, None]
      b_B11 = jnp.arange(qkv_BLRX.shape[0])[:, None, None]
      rows_BGSX = qkv_BLRX[b_B11, jnp.minimum(row_BGS, L - 1), heads_1G1]
      qkv_BgSX = context.slot_groups(jnp.where(mine_BGS[..., None], rows_BGSX, 0), C)
      mine = functools.partial(context.my_groups, C=C, axis=1)
      o_BgSD = self._attend_slots(qkv_BgSX[..., :D], qkv_BgSX[..., D:], mine(pos_BGS),
                                  mine(seg[0]) if seg else None, local=True)
      return _averaged(context.groups_slots(o_BgSD)[:, :G], row_BGS[:, :G], heads_G[None, :, None], L, R)
    zz_BGS = context.pad_groups(context.split_index(idx_BGS, T, C), C, 1, T)
    qkv_BTRX = jnp.concatenate([qk_BTRD, v_BTRD.astype(qk_BTRD.dtype)], axis=-1)
    return context.per_share(share, qkv_BTRX, rows=(zz_BGS, *slot_args),
                             out_shape=jax.ShapeDtypeStruct(qk_BTRD.shape, qk_BTRD.dtype))

  def _rope(self, x_BGSD, pos_BGS):
    """RoPE with a position per (group, slot), groups folded into the batch; back as `[B, S, G, D]`."""
    B, G, S, D = x_BGSD.shape
    x_XS1D = x_BGSD.reshape(B * G, S, 1, D)
    return rope(x_XS1D, pos_BGS.reshape(B * G, S), self.rope_theta).reshape(B, G, S, D).transpose(0, 2, 1, 3)


def _heads(groups: int, heads: int) -> jax.Array:
  """The head of each group (head g // C, cluster g % C)."""
  return jnp.arange(groups) // (groups // heads)


def _averaged(o_BGSD, idx_BGS, heads_1G1, T: int, R: int) -> jax.Array:
  """`[B, T, R, D]`: each token's slot outputs per head, averaged over the head's groups that took it
  (zero where none did); slots at index T are dropped."""
  B, D = o_BGSD.shape[0], o_BGSD.shape[-1]
  b_B11 = jnp.arange(B)[:, None, None]
  sum_BTRD = jnp.zeros((B, T, R, D), o_BGSD.dtype).at[b_B11, idx_BGS, heads_1G1].add(o_BGSD, mode='drop')
  count_BTR = jnp.zeros((B, T, R), o_BGSD.dtype).at[b_B11, idx_BGS, heads_1G1].add(1.0, mode='drop')
  return sum_BTRD / jnp.maximum(count_BTR, 1.0)[..., None]


class CausalAttention(Attention):
  """routing_causal: nearest-centroid clusters, each laid out in position order, causal windows in them."""

  causal = True
  decodes = True

  def _window(self) -> int:
    return self.routing.window

  def _slots(self, seq_len: int) -> int:
    return _capacity(self.routing, seq_len)

  @staticmethod
  def cluster_slots(cfg: ml_collections.ConfigDict, seq_len: int) -> tuple[int, int]:
    """A cluster's capacity slots, each seeing the last `window` of them."""
    return _capacity(cfg.routing, seq_len), cfg.routing.window

  def _taken(self, score_BRCT) -> jax.Array:
    """`[B, R*C, T]`: whether group (head, cluster) takes each token: its nearest centroid."""
    B, R, C, T = score_BRCT.shape
    nearest_BRCT = jnp.argmax(score_BRCT, axis=2)[:, :, None, :] == jnp.arange(C)[None, None, :, None]
    return nearest_BRCT.reshape(B, R * C, T)

  def _clusters(self, score_BRCT, pos_BT) -> jax.Array:
    rt = self.routing
    taken_BGT = self._taken(score_BRCT)
    idx_BGS, keep_BGT = causal_slots(taken_BGT, pos_BT, per_token=rt.capacity_factor / rt.num_clusters,
                                        num_slots=self._slots(score_BRCT.shape[-1]))
    self.sow(nnx.Intermediate, 'routing_dropped_share',
             1 - jnp.sum(keep_BGT) / (taken_BGT.shape[0] * taken_BGT.shape[-1] * rt.num_heads))
    return idx_BGS

  def _document_clusters(self, score_BRCT, pos_BT, seg_BT) -> jax.Array:
    rt = self.routing
    taken_BGT = self._taken(score_BRCT)
    keep_BGT = document_causal_keep(taken_BGT, pos_BT, seg_BT, per_token=rt.capacity_factor / rt.num_clusters)
    T = score_BRCT.shape[-1]
    idx_BGS = fill_slots(keep_BGT, min(T, 2 * self._slots(T)))
    placed = jnp.sum(idx_BGS < T)
    self.sow(nnx.Intermediate, 'routing_dropped_share',
             1 - placed / (taken_BGT.shape[0] * T * rt.num_heads))
    return idx_BGS

  def init_cache(self, batch: int, max_len: int) -> Cache:
    groups = self.routing.num_heads * self.routing.num_clusters
    return slot_cache(self, batch, max_len, self._slots(max_len), groups, self.routing_wqk.shape[-1])

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    if cache is None:
      y_BTD, _ = dense.Attention.__call__(self, x_BTD, pos_BT, seg_BT)
      return y_BTD + self._routing_heads(x_BTD, pos_BT, seg_BT, update_state), None
    rt = self.routing
    y_BTD, dense_cache = dense.Attention.__call__(self, x_BTD, pos_BT, cache=cache['dense'])
    qk_BTRD, v_BTRD, score_BRCT = self._route_inputs(x_BTD, update_state)
    B, T, R, D = qk_BTRD.shape
    C = rt.num_clusters
    taken_BGT = self._taken(score_BRCT)
    rank_BGT, keep_BGT = causal_ranks(taken_BGT, pos_BT, cache['count'], per_token=rt.capacity_factor / C,
                                      num_slots=cache['k'].shape[1])
    qk_BTRD = rope(qk_BTRD * D**0.5, pos_BT, self.rope_theta)
    def per_group(x_BTRD):
      return jnp.broadcast_to(x_BTRD[:, :, :, None], (B, T, R, C, D)).reshape(B, T, R * C, D)
    qk_BTGD, v_BTGD = per_group(qk_BTRD), per_group(v_BTRD)
    o_BTGD, routed_cache = cached_slot_attention(
        qk_BTGD, qk_BTGD, v_BTGD, rank_BGT.transpose(0, 2, 1), keep_BGT.transpose(0, 2, 1),
        {'k': cache['k'], 'v': cache['v'], 'count': cache['count']}, window=rt.window)
    o_BTRD = o_BTGD.reshape(B, T, R, C, D).sum(axis=3)  # a token sits in one cluster at most
    y_BTD += jnp.einsum('btrh,rhd->btd', o_BTRD, self.routing_wo[...].astype(self.dtype))
    return y_BTD, {'dense': dense_cache, **routed_cache}


def _capacity(rt: ml_collections.ConfigDict, seq_len: int) -> int:
  """routing_causal's slots per cluster: `capacity_factor` T / C, at most T."""
  return min(seq_len, math.ceil(rt.capacity_factor * seq_len / rt.num_clusters))
