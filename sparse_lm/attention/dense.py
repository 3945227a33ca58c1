"""Dense causal grouped-query attention (Ainslie et al. 2023) with rotary embeddings and a KV cache."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels.flash_attention import flash_attention
from sparse_lm import context, sharding
from sparse_lm.attention import base, kv_cache
from sparse_lm.layers import output_stddev, param, rope

Cache = dict[str, jax.Array]


class Attention(base.Attention):
  """`num_heads` query heads share `num_kv_heads` key/value heads."""

  decodes = True
  segments = True
  context_parallel = True

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, hq, hkv, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = cfg.param_dtype
    self.wq = param(rngs, (d, hq, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.wk = param(rngs, (d, hkv, dh), ('embed', 'kv_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.wv = param(rngs, (d, hkv, dh), ('embed', 'kv_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    self.wo = param(rngs, (hq, dh, d), ('q_heads', 'head_dim', 'embed'),
                    stddev=output_stddev(hq * dh, cfg.num_layers), dtype=pd)
    self.window = self.attention_window(cfg)
    self.keep_settings(cfg)

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    cls.attention_window(cfg)

  @classmethod
  def attended_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    span = cls.attention_window(cfg) or seq_len
    return sum(min(t + 1, span) for t in range(seq_len)) / seq_len

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """Rotated keys and values, one row a position; with a window, a ring of `window` rows (all that
    decoding reads)."""
    rows = max_len if self.window is None else min(max_len, self.window)
    shape = (batch, rows) + self.wk.shape[1:]
    return {'k': jnp.zeros(shape, self.dtype), 'v': jnp.zeros(shape, self.dtype)}

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    del update_state  # no state besides the parameters
    q_BTHD, k_BTKD, v_BTKD = self._qkv(x_BTD, pos_BT)
    if cache is None and context.size() > 1:
      if not self.context_parallel:
        raise ValueError(f'{type(self).__module__} does not run with its sequences split (mesh.context)')
      o_BTHD = self.attend_split(q_BTHD, k_BTKD, v_BTKD, pos_BT, seg_BT)
    elif cache is None:
      o_BTHD = self.attend(q_BTHD, k_BTKD, v_BTKD, seg_BT)
    else:
      o_BTHD, cache = self._attend_cached(q_BTHD, k_BTKD, v_BTKD, pos_BT, cache)
    return self._output(o_BTHD), cache

  def attend_split(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, seg_BT=None) -> jax.Array:
    """`attend` with each sequence split over the context axis, zigzag-ordered (sparse_lm/context.py):
    keys and values around the axis's ring."""
    return context.ring_attention(q_BTHD, k_BTKD, v_BTKD, pos_BT, seg_BT, window=self.window,
                                  implementation=self.kernel)

  def _qkv(self, x_BTD, pos_BT) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys (both rotated) and values in the compute dtype."""
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wq[...].astype(self.dtype))
    k_BTKD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wk[...].astype(self.dtype))
    v_BTKD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wv[...].astype(self.dtype))
    q_BTHD = sharding.constrain(rope(q_BTHD, pos_BT, self.rope_theta),
                                ('batch', 'length', 'q_heads', 'head_dim'))
    return q_BTHD, rope(k_BTKD, pos_BT, self.rope_theta), v_BTKD

  def _output(self, o_BTHD) -> jax.Array:
    y_BTD = jnp.einsum('bthk,hkd->btd', o_BTHD, self.wo[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed'))

  def attend(self, q_BTHD, k_BTKD, v_BTKD, seg_BT=None) -> jax.Array:
    attend = functools.partial(flash_attention, causal=True, window=self.window, implementation=self.kernel)
    if seg_BT is None:
      return sharding.attention_per_device(attend, q_BTHD, k_BTKD, v_BTKD)
    return sharding.attention_per_device(lambda q, k, v, seg: attend(q, k, v, segment_ids=seg),
                                         q_BTHD, k_BTKD, v_BTKD, seg_BT)

  def attend_from_cache(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, cache: Cache) -> tuple[jax.Array, Cache]:
    """New tokens at `pos_BT` against the rows cached before them and their own rows, then written:
    reading first lets the step update the cache in place (`kv_cache.after`)."""
    S = cache['k'].shape[1]
    s_11S = jnp.arange(S)[None, None, :]
    keep_BTS = s_11S < pos_BT[:, :1, None]  # the cached rows: every query sees all of them
    keep_BTT = pos_BT[:, None, :] <= pos_BT[:, :, None]  # the new rows: causal among themselves
    o_BTHD = kv_cache.attend(q_BTHD, cache['k'], cache['v'], keep_BTS, new=(k_BTKD, v_BTKD, keep_BTT))
    k_BTKD, v_BTKD = kv_cache.after(k_BTKD, o_BTHD), kv_cache.after(v_BTKD, o_BTHD)
    return o_BTHD, self._written(cache, k_BTKD, v_BTKD, pos_BT)

  def _attend_cached(self, q_BTHD, k_BTKD, v_BTKD, pos_BT, cache: Cache):
    """A prompt into an empty cache runs `attend` (the kernels), then writes the cache; other calls
    write first and attend from the cache (`kv_cache`). All rows decode in step, so the first new
    token's position is the write offset."""
    def prefill(q_BTHD, k_BTKD, v_BTKD, pos_BT, cache):
      return self.attend(q_BTHD, k_BTKD, v_BTKD), self._written(cache, k_BTKD, v_BTKD, pos_BT)

    def extend(q_BTHD, k_BTKD, v_BTKD, pos_BT, cache):
      if self.window is None:
        return self.attend_from_cache(q_BTHD, k_BTKD, v_BTKD, pos_BT, cache)
      o_BTHD, ring_k, ring_v = kv_cache.window_attend(q_BTHD, cache['k'], cache['v'], k_BTKD, v_BTKD, pos_BT,
                                                      self.window)
      return o_BTHD, {**cache, 'k': ring_k, 'v': ring_v}
    return kv_cache.prefill_or_extend(pos_BT[0, 0], q_BTHD.shape[1], prefill, extend,
                                      q_BTHD, k_BTKD, v_BTKD, pos_BT, cache)

  def _written(self, cache: Cache, k_BTKD, v_BTKD, pos_BT) -> Cache:
    """The cache with the new tokens' rows (a ring's slots with a window)."""
    if self.window is None:
      write = functools.partial(kv_cache.write_rows, start=pos_BT[0, 0])
      return {**cache, 'k': write(cache['k'], k_BTKD), 'v': write(cache['v'], v_BTKD)}
    return {**cache, 'k': kv_cache.ring_write(cache['k'], k_BTKD, pos_BT),
            'v': kv_cache.ring_write(cache['v'], v_BTKD, pos_BT)}
