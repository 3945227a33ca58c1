"""The decoder-only transformer: embeddings, pre-norm blocks of (attention, MLP) chosen by name,
a final RMSNorm and (optionally tied) unembedding."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels._reference import MASK_VALUE
from sparse_lm import attention, mlp, sharding
from sparse_lm.layers import RMSNorm, param

# Decoding state: the number of positions already written, and one cache per layer.
Cache = dict


def padded_vocab(cfg: ml_collections.ConfigDict) -> int:
  """The embedding table is padded so it splits evenly over the `tensor` axis and tiles well."""
  return -(-cfg.vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple


def mlp_name(cfg: ml_collections.ConfigDict, layer: int) -> str:
  """The MLP of block `layer`: `model.mlp`, except that an MoE model keeps dense MLPs in its first
  `moe.first_dense` blocks and, after them, uses MoE only in every `moe.every`-th block."""
  if cfg.mlp != 'moe':
    return cfg.mlp
  after = layer - cfg.moe.first_dense
  return 'moe' if after >= 0 and after % cfg.moe.every == 0 else 'dense'


def attention_class(cfg: ml_collections.ConfigDict, layer: int) -> type[attention.base.Attention]:
  """The attention of block `layer`: `model.attention`'s class, or the one its hybrid puts there."""
  return attention.REGISTRY[cfg.attention].at_layer(cfg, layer)


def is_causal(cfg: ml_collections.ConfigDict) -> bool:
  """Whether the architecture guarantees that the output at t never depends on inputs after t: not so
  for the papers' MoSA and routing attention, nor for expert-choice or capacity-limited MoE."""
  return all(attention_class(cfg, layer).causal and mlp.REGISTRY[mlp_name(cfg, layer)].is_causal(cfg)
             for layer in range(cfg.num_layers))


class Block(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.attn = attention_class(cfg, layer)(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
    self.mlp = mlp.REGISTRY[mlp_name(cfg, layer)](cfg, rngs=rngs)
    self.remat_attention = cfg.remat_attention

  def __call__(self, x_BTD, pos_BT, seg_BT=None, cache=None, *, update_state: bool = False):
    if self.remat_attention and cache is None:
      # Only the sublayer's input is kept for the backward, which runs its forward again. What a sparse
      # attention saves for its backward (three branches' K/V and outputs for NSA) is several times its
      # input, while recomputing it costs one more forward of a sublayer whose FLOPs are small.
      def attend(attn, norm, x_BTD, pos_BT, seg_BT):
        return attn(norm(x_BTD), pos_BT, seg_BT, update_state=update_state)
      h_BTD, cache = nnx.remat(attend)(self.attn, self.attn_norm, x_BTD, pos_BT, seg_BT)
    else:
      h_BTD, cache = self.attn(self.attn_norm(x_BTD), pos_BT, seg_BT, cache, update_state=update_state)
    x_BTD = x_BTD + h_BTD
    return x_BTD + self.mlp(self.mlp_norm(x_BTD), update_state=update_state), cache


class Transformer(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, v, pd = cfg.d_model, padded_vocab(cfg), cfg.param_dtype
    # Tied tables double as the output layer, so they start at the scale that gives unit logits.
    self.embed = param(rngs, (v, d), ('vocab', 'embed'), stddev=d**-0.5 if cfg.tie_embeddings else 1.0,
                       dtype=pd)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(d, eps=cfg.norm_eps, param_dtype=pd)
    self.unembed = None if cfg.tie_embeddings else param(rngs, (d, v), ('embed', 'vocab'),
                                                         stddev=d**-0.5, dtype=pd)
    self.vocab_size = cfg.vocab_size
    self.dtype = jnp.dtype(cfg.dtype)
    self.remat = cfg.remat

  def init_cache(self, batch: int, max_len: int) -> Cache:
    return {'end': jnp.zeros((), jnp.int32),
            'layers': [blk.attn.init_cache(batch, max_len) for blk in self.blocks]}

  def __call__(self, tokens_BT: jax.Array, cache: Cache | None = None, *,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
               update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    """Float32 logits over the real vocabulary (padding entries masked); with a cache, the tokens
    continue the cached sequence and the returned cache includes them. `segment_ids` (int32 [B, T], 0
    for padding) keep each document of a packed row to itself, and `positions` (within each document)
    restart RoPE at each; None: one document a row, at positions 0, 1, .... `update_state`: the train
    step's pass, in which layers move their non-parameter state (router thresholds, centroids, biases)."""
    return self.from_embeddings(self.embed_tokens(tokens_BT), cache, segment_ids=segment_ids,
                                positions=positions, update_state=update_state)

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)
    return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed'))

  def from_embeddings(self, x_BTD: jax.Array, cache: Cache | None = None, *,
                      segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
                      update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    """The network above the embedding lookup; causality probes differentiate through this."""
    B, T, _ = x_BTD.shape
    if cache is not None and (segment_ids is not None or positions is not None):
      raise ValueError('decoding with a cache runs one document a row: no segment_ids or positions')
    start = 0 if cache is None else cache['end']
    pos_BT = (jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T)) if positions is None
              else positions.astype(jnp.int32))
    seg_BT = None if segment_ids is None else segment_ids.astype(jnp.int32)
    new_layers = []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else cache['layers'][i]
      if self.remat and cache is None:
        x_BTD, layer_cache = nnx.remat(lambda b, x, p, s: b(x, p, s, update_state=update_state))(
            block, x_BTD, pos_BT, seg_BT)
      else:
        x_BTD, layer_cache = block(x_BTD, pos_BT, seg_BT, layer_cache, update_state=update_state)
      new_layers.append(layer_cache)
    x_BTD = self.final_norm(x_BTD)
    if self.unembed is None:
      logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, self.embed[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, self.unembed[...].astype(self.dtype),
                              preferred_element_type=jnp.float32)
    logits_BTV = sharding.constrain(logits_BTV, ('batch', 'length', 'vocab'))
    real_V = jnp.arange(logits_BTV.shape[-1]) < self.vocab_size
    logits_BTV = jnp.where(real_V[None, None, :], logits_BTV, MASK_VALUE)
    new_cache = None if cache is None else {'end': start + T, 'layers': new_layers}
    return logits_BTV, new_cache
