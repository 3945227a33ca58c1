"""Dense causal grouped-query attention (Ainslie et al. 2023) with rotary embeddings and a KV cache."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels.flash_attention import flash_attention
from sparse_lm import sharding
from sparse_lm.attention import core
from sparse_lm.layers import param, rope

Cache = dict[str, jax.Array]


class Attention(nnx.Module):
  """`num_heads` query heads share `num_kv_heads` key/value heads."""

  causal = True  # the output at t never depends on inputs after t
  # The config check requires num_heads * head_dim == d_model where the heads span the model width.
  heads_span_width = True

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, hq, hkv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = cfg.param_dtype
    self.wq = param(rngs, (d, hq, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.wk = param(rngs, (d, hkv, dh), ('embed', 'kv_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.wv = param(rngs, (d, hkv, dh), ('embed', 'kv_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    # Output projections start small so each residual branch adds little at init (GPT-2's scheme).
    out_std = (hq * dh) ** -0.5 / (2 * cfg.num_layers) ** 0.5
    self.wo = param(rngs, (hq, dh, d), ('q_heads', 'head_dim', 'embed'), stddev=out_std, dtype=pd)
    self.window = self.attention_window(cfg)
    self.kernel = cfg.kernel
    self.rope_theta = cfg.rope_theta
    self.dtype = jnp.dtype(cfg.dtype)

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values this variant cannot run; called before anything compiles."""
    cls.attention_window(cfg)

  @staticmethod
  def attention_window(cfg: ml_collections.ConfigDict) -> int | None:
    del cfg
    return None

  @classmethod
  def attended_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Keys one query attends to, averaged over the positions of a causal sequence (FLOP count)."""
    span = cls.attention_window(cfg) or seq_len
    return sum(min(t + 1, span) for t in range(seq_len)) / seq_len

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Parameters (by name) that a token does not use once in a matmul, with how often it does."""
    del cfg
    return {}

  def init_cache(self, batch: int, max_len: int) -> Cache:
    shape = (batch, max_len) + self.wk.shape[1:]
    return {'k': jnp.zeros(shape, self.dtype), 'v': jnp.zeros(shape, self.dtype)}

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wq[...].astype(self.dtype))
    k_BTKD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wk[...].astype(self.dtype))
    v_BTKD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wv[...].astype(self.dtype))
    q_BTHD = sharding.constrain(rope(q_BTHD, pos_BT, self.rope_theta),
                                ('batch', 'length', 'q_heads', 'head_dim'))
    k_BTKD = rope(k_BTKD, pos_BT, self.rope_theta)
    if cache is None and self.kernel == 'pallas':
      kernel = functools.partial(flash_attention, causal=True, window=self.window)
      o_BTHD = sharding.attention_per_device(kernel, q_BTHD, k_BTKD, v_BTKD).astype(self.dtype)
    elif cache is None and self.window:
      o_BTHD = core.local_attend(q_BTHD, k_BTKD, v_BTKD, window=self.window)
    elif cache is None:
      o_BTHD = core.attend(q_BTHD, k_BTKD, v_BTKD, pos_BT, pos_BT)
    else:
      o_BTHD, cache = self._attend_cached(q_BTHD, k_BTKD, v_BTKD, pos_BT, cache)
    y_BTD = jnp.einsum('bthk,hkd->btd', o_BTHD, self.wo[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), cache

  def _attend_cached(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, cache: Cache):
    # All rows decode in step, so the first new token's position is the write offset.
    start = pos_BT[0, 0]
    k_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['k'], k_BTKD.astype(cache['k'].dtype), start, 1)
    v_BSKD = jax.lax.dynamic_update_slice_in_dim(cache['v'], v_BTKD.astype(cache['v'].dtype), start, 1)
    # Slots not yet written sit at positions beyond every query, so the causal mask hides them.
    kpos_BS = jnp.broadcast_to(jnp.arange(k_BSKD.shape[1]), k_BSKD.shape[:2])
    o_BTHD = core.attend(q_BTHD, k_BSKD, v_BSKD, pos_BT, kpos_BS, window=self.window)
    return o_BTHD, {'k': k_BSKD, 'v': v_BSKD}
