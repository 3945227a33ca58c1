"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively
Trainable Sparse Attention", arXiv:2502.11089).

Each query t attends through three branches and mixes them with learned gates (Eq. 5):
`o_t = sum_c g_t^c Attn(q_t, K_t^c, V_t^c)`, c in {compressed, selected, sliding window}.

- compressed (Eq. 7): blocks of `l` keys at stride `d` are mapped to one key (and one value) each by an
  MLP `phi` with an intra-block position encoding. Query t sees block i once the block's last token,
  `i*d + l - 1`, is at or before t; a query that sees no block gets zero from this branch.
- selected (Eqs. 8-12): the compressed branch's attention probabilities score the selection blocks of
  `l'` tokens (Eq. 9 sums the compressed blocks that overlap each selection block), summed over the query
  heads of a GQA group (Eq. 10); each token takes the top `n` blocks (Eq. 11), always including the first
  block and the two local ones (Sec. 4.1), and attends causally to their raw keys (Eq. 12) through
  `pallas_kernels.selected_attention`.
- sliding window: the `w` most recent keys, through `pallas_kernels.flash_attention(window=w)`.

Memory is linear in T on both paths: the compressed branch (`pallas_kernels.compressed_attention`) returns
each query's log-sum-exp instead of its `[T, T/d]` probabilities, and `pallas_kernels.block_selection`
recomputes them tile by tile to score and pick the blocks, writing only the `[B, T, Hkv, n]` indices; the
`xla` path computes the same in chunks of queries (`map_query_chunks`, rematerialised in the backward).

Where this departs from the paper, and why:
- Eq. 9 is written with the paper's own block indexing; here compressed block i covers tokens
  `[i*d, i*d + l)` and selection block j covers `[j*l', (j+1)*l')`, so the score of block j sums, over
  each stride unit u of the block, the compressed blocks covering u (`i = u - m` for `m < l/d`). That is
  the same weighting (1, 2, ..., 2, 1 for l = 2d) aligned with Eqs. 7 and 12.
- The paper does not say how positions enter the compressed branch. `phi` sees un-rotated keys (the
  position encoding inside the block carries order) and its output is rotated (RoPE) at the block's last
  position, so compressed scores keep RoPE's relative-distance form.
- The gate is `sigmoid(x W + b)`, a one-layer MLP per head and branch.
- The top-n indices carry no gradient, as in the paper; `phi` learns through the compressed branch.

Documents in a packed row (`seg_BT`). The three branches keep to the query's document: the window by
segment ids (`flash_attention`), the compressed branch by seeing only blocks that begin at or after the
document's start (`compressed_attention`), and selection by choosing only blocks from the document's first
one, which replaces block 0 as the forced first block (`block_selection`); compressed keys are rotated at
their last token's position in the document. How blocks meet document boundaries, and why:
- chosen: each document starts on the selection grid (a multiple of `sel_block`, which `cmp_stride`
  divides), the packer padding the document before it (`document_alignment`, `sparse_lm.data`). Then a
  document's compressed and selection blocks are exactly the blocks it has alone, and the branches need
  only masks and tile bounds, no new block layout, so every kernel keeps its grid. The cost is padding:
  on the embedded corpus 0.21% of a row's tokens at the paper's 64 (`python benchmarks/packing.py`,
  BENCHMARKS.md), rising with shorter documents (at most 63 tokens a document).
- masking partial blocks (documents anywhere, blocks straddling a boundary hidden): no padding, but a
  document's blocks then depend on where it lands in the row (a block of 32 tokens at stride 16 starting
  mid-document summarises different tokens than alone), so a document would not be scored as alone, and
  the tokens of a document's first partial selection block would have no block to select.
- per-document block positions (a block grid restarting at each document): exact without padding, but the
  compressed blocks would no longer be a strided slice of the row, so phi, the compressed kernel's key
  positions and block selection's Eq. 9 weights would all need per-document gathers.
A row that does not start its documents on the grid is still leak-free (blocks are kept to a document by
their first token, choices rounded up to whole blocks) but a document then differs from itself alone.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pallas_kernels.block_selection import block_selection, block_selection_reference
from pallas_kernels.compressed_attention import (
  block_ends,
  compressed_attention,
  compressed_attention_reference,
)
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.selected_attention import selected_attention, selected_attention_reference
from sparse_lm import sharding
from sparse_lm.attention import base
from sparse_lm.errors import ConfigError, require_positive
from sparse_lm.layers import output_stddev, param, rope

Cache = dict[str, jax.Array]


class Attention(base.Attention):
  """NSA with grouped-query heads; `model.nsa` holds l, d, l', n, w and whether K/V are shared."""

  decodes = True
  segments = True

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    n = cfg.nsa
    d, hq, hkv, dh, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    branches_kv = 1 if n.shared_kv else 3  # the paper gives each branch its own keys and values
    self.wq = param(rngs, (d, hq, dh), ('embed', 'q_heads', 'head_dim'), stddev=d**-0.5, dtype=pd)
    kv_axes = ('embed', None, 'kv_heads', 'head_dim')
    self.wk = param(rngs, (d, branches_kv, hkv, dh), kv_axes, stddev=d**-0.5, dtype=pd)
    self.wv = param(rngs, (d, branches_kv, hkv, dh), kv_axes, stddev=d**-0.5, dtype=pd)
    # Eq. 7's phi, for keys and for values: a two-layer MLP over a block's l entries plus a learned
    # position-in-block encoding.
    flat, hidden = n.cmp_block * dh, 2 * dh
    for kind in ('k', 'v'):
      setattr(self, f'cmp_pos_{kind}', param(rngs, (n.cmp_block, dh), (None, 'head_dim'), stddev=0.02,
                                             dtype=pd))
      setattr(self, f'cmp_w1_{kind}', param(rngs, (flat, hidden), (None, None), stddev=flat**-0.5, dtype=pd))
      setattr(self, f'cmp_w2_{kind}', param(rngs, (hidden, dh), (None, None), stddev=hidden**-0.5,
                                            dtype=pd))
    self.w_gate = param(rngs, (d, hq, 3), ('embed', 'q_heads', None), stddev=d**-0.5, dtype=pd)
    self.b_gate = nnx.Param(jnp.zeros((hq * 3,), jnp.dtype(pd)), axes=(None,))
    self.wo = param(rngs, (hq, dh, d), ('q_heads', 'head_dim', 'embed'),
                    stddev=output_stddev(hq * dh, cfg.num_layers), dtype=pd)
    self.nsa = ml_collections.FrozenConfigDict(n)
    self.keep_settings(cfg)

  # ------------------------------------------------------------------------- config and FLOPs

  @staticmethod
  def defaults() -> dict:
    n = ml_collections.ConfigDict()  # the paper's settings (Sec. 4.1)
    n.cmp_block = 32  # l: tokens per compressed block
    n.cmp_stride = 16  # d: stride between compressed blocks
    n.sel_block = 64  # l': tokens per selection block
    n.num_selected = 16  # n: selected blocks per query, the first and two local ones included
    n.window = 512  # w: the sliding-window branch
    n.shared_kv = False  # one K/V projection for all three branches instead of one each
    return {'nsa': n}

  @classmethod
  def document_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    return cfg.nsa.sel_block  # a multiple of cmp_stride (check_config), so compressed blocks align too

  @staticmethod
  def tiny_config() -> dict:
    return {'nsa': {'cmp_block': 4, 'cmp_stride': 2, 'sel_block': 4, 'num_selected': 3, 'window': 5}}

  @staticmethod
  def check_config(cfg: ml_collections.ConfigDict) -> None:
    n = cfg.nsa
    require_positive(n, 'model.nsa', ('cmp_block', 'cmp_stride', 'sel_block', 'num_selected', 'window'))
    if n.num_selected < 3:
      raise ConfigError(f'model.nsa.num_selected={n.num_selected} must be at least 3: the first block and '
                        'the two local blocks are always selected (NSA Sec. 4.1)')
    if n.cmp_block % n.cmp_stride or n.sel_block % n.cmp_stride:
      raise ConfigError(
          f'model.nsa.cmp_stride={n.cmp_stride} must divide model.nsa.cmp_block={n.cmp_block} and '
          f'model.nsa.sel_block={n.sel_block} (NSA Eq. 9 sums whole stride units)')

  @staticmethod
  def attended_keys(cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Compressed blocks visible + keys of the selected blocks + window keys, averaged over t."""
    n = cfg.nsa
    total = 0
    for t in range(seq_len):
      cmp = max(0, (t + 1 - n.cmp_block) // n.cmp_stride + 1)  # blocks ending at or before t
      visible_blocks = t // n.sel_block + 1
      sel = t + 1 if visible_blocks <= n.num_selected else (
          (n.num_selected - 1) * n.sel_block + t % n.sel_block + 1)
      total += cmp + sel + min(t + 1, n.window)
    return total / seq_len

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    # phi runs once per compressed block, i.e. once every `cmp_stride` tokens; the position encoding is
    # an addition, not a matmul.
    per_block = 1 / cfg.nsa.cmp_stride
    return {'cmp_w1_k': per_block, 'cmp_w2_k': per_block, 'cmp_w1_v': per_block,
            'cmp_w2_v': per_block, 'cmp_pos_k': 0.0, 'cmp_pos_v': 0.0}

  # ------------------------------------------------------------------------- pieces

  def _num_compressed(self, length: int) -> int:
    return max(0, (length - self.nsa.cmp_block) // self.nsa.cmp_stride + 1)

  def _compress(self, raw_BXKD: jax.Array, num_blocks: int, kind: str) -> jax.Array:
    """phi (Eq. 7) on the first `num_blocks` blocks of `raw_BXKD` (blocks start every d positions)."""
    l, stride = self.nsa.cmp_block, self.nsa.cmp_stride
    B, _, K, D = raw_BXKD.shape
    idx_NL = jnp.arange(num_blocks)[:, None] * stride + jnp.arange(l)[None, :]
    blocks_BNLKD = raw_BXKD[:, idx_NL]
    pos_11L1D = getattr(self, f'cmp_pos_{kind}')[...].astype(self.dtype)[None, None, :, None, :]
    x_BNKX = (blocks_BNLKD + pos_11L1D).transpose(0, 1, 3, 2, 4).reshape(B, num_blocks, K, l * D)
    h_BNKF = jax.nn.silu(x_BNKX @ getattr(self, f'cmp_w1_{kind}')[...].astype(self.dtype))
    return h_BNKF @ getattr(self, f'cmp_w2_{kind}')[...].astype(self.dtype)

  def _compressed_and_choice(self, q_BTHD, ck_BCKD, cv_BCKD, pos_BT, num_keys: int, fused: bool,
                             seg_BT=None):
    """The compressed branch's output and the selected blocks; compressed keys rotated (RoPE) at their
    blocks' last tokens (at those tokens' positions in their documents under `seg_BT`). `fused`: the
    kernels (training), else the chunked XLA path."""
    n = self.nsa
    ends_C = block_ends(ck_BCKD.shape[1], cmp_block=n.cmp_block, cmp_stride=n.cmp_stride)
    ends_BC = jnp.broadcast_to(ends_C, ck_BCKD.shape[:2]) if seg_BT is None else pos_BT[:, ends_C]
    ck_BCKD = rope(ck_BCKD, ends_BC, self.rope_theta)
    o_cmp, lse_BHT = self._compressed_branch(q_BTHD, ck_BCKD, cv_BCKD, pos_BT, seg_BT, fused)
    return o_cmp, self._block_indices(q_BTHD, ck_BCKD, lse_BHT, pos_BT, seg_BT, num_keys, fused)

  def _compressed_branch(self, q_BTHD, ck_BCKD, cv_BCKD, pos_BT, seg_BT, fused: bool):
    """Eq. 8 over the visible compressed blocks: the output and the log-sum-exp `[B, H, T]` that block
    selection recomputes the probabilities from (`ck_BCKD` already rotated). Linear in memory on both
    paths: the kernel never holds `[T, C]` scores, the XLA path holds them for a chunk of queries."""
    n = self.nsa
    attend = functools.partial(compressed_attention, cmp_block=n.cmp_block, cmp_stride=n.cmp_stride)
    if seg_BT is not None:  # a packed row: queries at 0..T-1, blocks kept to each query's document
      attend = functools.partial(attend, implementation='pallas' if fused else 'xla')
      return sharding.attention_per_device(lambda q, k, v, seg: attend(q, k, v, segment_ids=seg),
                                           q_BTHD, ck_BCKD, cv_BCKD, seg_BT)
    if fused:
      return sharding.attention_per_device(attend, q_BTHD, ck_BCKD, cv_BCKD)
    return compressed_attention_reference(q_BTHD, ck_BCKD, cv_BCKD, cmp_block=n.cmp_block,
                                        cmp_stride=n.cmp_stride, pos_BT=pos_BT)

  def _block_indices(self, q_BTHD, ck_BCKD, lse_BHT, pos_BT, seg_BT, num_keys: int, fused: bool) -> jax.Array:
    """Eqs. 9-11: the top-n selection blocks per token and kv head, from the compressed probabilities
    recomputed from the log-sum-exp (summed over the heads of a group, Eq. 10). No gradient: the indices
    are discrete, as in the paper."""
    n = self.nsa
    rules = dict(cmp_block=n.cmp_block, cmp_stride=n.cmp_stride, sel_block=n.sel_block,
                 num_selected=n.num_selected)
    q_BTHD, ck_BCKD, lse_BHT = map(jax.lax.stop_gradient, (q_BTHD, ck_BCKD, lse_BHT))
    if seg_BT is not None:
      select = functools.partial(block_selection, implementation='pallas' if fused else 'xla', **rules)
      return sharding.attention_per_device(lambda q, ck, lse, seg: select(q, ck, lse, segment_ids=seg),
                                           q_BTHD, ck_BCKD, lse_BHT, seg_BT)
    if fused:
      return sharding.attention_per_device(functools.partial(block_selection, **rules), q_BTHD, ck_BCKD,
                                           lse_BHT)
    return block_selection_reference(q_BTHD, ck_BCKD, lse_BHT, pos_BT=pos_BT,
                                     num_blocks=-(-num_keys // n.sel_block), **rules)

  def _project(self, x_BTD, pos_BT):
    q_BTHD = jnp.einsum('btd,dhk->bthk', x_BTD, self.wq[...].astype(self.dtype))
    q_BTHD = sharding.constrain(rope(q_BTHD, pos_BT, self.rope_theta),
                                ('batch', 'length', 'q_heads', 'head_dim'))
    k_BTJKD = jnp.einsum('btd,djkh->btjkh', x_BTD, self.wk[...].astype(self.dtype))
    v_BTJKD = jnp.einsum('btd,djkh->btjkh', x_BTD, self.wv[...].astype(self.dtype))
    return q_BTHD, k_BTJKD, v_BTJKD

  def _branch(self, kv, name: str) -> jax.Array:
    """One branch's keys or values: from `[B, T, J, K, D]` (a forward pass) or from a cache's list of J
    `[B, S, K, D]` arrays (J = 1 when the branches share K/V)."""
    shared = (len(kv) if isinstance(kv, list) else kv.shape[2]) == 1
    j = 0 if shared else ('cmp', 'slc', 'win').index(name)
    return kv[j] if isinstance(kv, list) else kv[:, :, j]

  # ------------------------------------------------------------------------- forward

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """Raw K/V as one `[B, S, K, D]` array per branch, so that decoding slices and gathers a branch's
    rows without copying the other branches, and the compressed blocks."""
    _, J, K, D = self.wk.shape
    C = self._num_compressed(max_len)
    return {'k': [jnp.zeros((batch, max_len, K, D), self.dtype) for _ in range(J)],
            'v': [jnp.zeros((batch, max_len, K, D), self.dtype) for _ in range(J)],
            'ck': jnp.zeros((batch, C, K, D), self.dtype), 'cv': jnp.zeros((batch, C, K, D), self.dtype)}

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    del update_state  # no state besides the parameters
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHD, k_BTJKD, v_BTJKD = self._project(x_BTD, pos_BT)
    if cache is None:
      k_BSJKD, v_BSJKD = k_BTJKD, v_BTJKD
      C = self._num_compressed(k_BSJKD.shape[1])
      ck_BCKD = self._compress(self._branch(k_BSJKD, 'cmp'), C, 'k')
      cv_BCKD = self._compress(self._branch(v_BSJKD, 'cmp'), C, 'v')
    else:
      cache = self._extend_cache(k_BTJKD, v_BTJKD, pos_BT[0, 0], cache)
      k_BSJKD, v_BSJKD, ck_BCKD, cv_BCKD = cache['k'], cache['v'], cache['ck'], cache['cv']

    fused = cache is None and self.kernel == 'pallas'
    num_keys = self._branch(k_BSJKD, 'slc').shape[1]
    o_cmp, idx_BTKn = self._compressed_and_choice(q_BTHD, ck_BCKD, cv_BCKD, pos_BT, num_keys, fused, seg_BT)

    if cache is None:
      o_slc, o_win = self._selected_and_window(q_BTHD, k_BSJKD, v_BSJKD, idx_BTKn, pos_BT, seg_BT, fused)
    else:
      o_slc, o_win = self._selected_and_window_from_cache(q_BTHD, k_BSJKD, v_BSJKD, idx_BTKn, pos_BT)
    o_BTHD = self._mix(x_BTD, o_cmp.astype(self.dtype), o_slc.astype(self.dtype), o_win.astype(self.dtype))
    y_BTD = jnp.einsum('bthk,hkd->btd', o_BTHD, self.wo[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), cache

  def _selected_and_window(self, q_BTHD, k_BTJKD, v_BTJKD, idx_BTKn, pos_BT, seg_BT, fused: bool):
    """Eq. 12 and the sliding window over the whole sequence (training, or a prompt without cache). The
    selected blocks are the query's document's already (`block_selection`); the window keeps to it by
    segment ids."""
    n = self.nsa
    ks_BTKD = rope(self._branch(k_BTJKD, 'slc'), pos_BT, self.rope_theta)
    kw_BTKD = rope(self._branch(k_BTJKD, 'win'), pos_BT, self.rope_theta)
    vs_BTKD, vw_BTKD = self._branch(v_BTJKD, 'slc'), self._branch(v_BTJKD, 'win')
    implementation = 'pallas' if fused else 'xla'
    selected = functools.partial(selected_attention, block_size=n.sel_block, implementation=implementation)
    window = functools.partial(flash_attention, causal=True, window=n.window, implementation=implementation)
    o_slc = sharding.attention_per_device(selected, q_BTHD, ks_BTKD, vs_BTKD, idx_BTKn)
    if seg_BT is None:
      return o_slc, sharding.attention_per_device(window, q_BTHD, kw_BTKD, vw_BTKD)
    return o_slc, sharding.attention_per_device(lambda q, k, v, seg: window(q, k, v, segment_ids=seg),
                                                q_BTHD, kw_BTKD, vw_BTKD, seg_BT)

  def _selected_and_window_from_cache(self, q_BTHD, k_BSJKD, v_BSJKD, idx_BTKn, pos_BT):
    """The same for new tokens at `pos_BT` over a cache of S positions, reading only the rows attended
    to: the selected blocks are gathered and then rotated, and the window branch sees the last
    `window + T - 1` positions (the cache keeps keys un-rotated, as phi wants them)."""
    n = self.nsa
    B, T = pos_BT.shape

    def rotate(k_BKXD, kpos_BKX):  # rope's "heads" axis of 1: each gathered row has its own position
      D = k_BKXD.shape[-1]
      return rope(k_BKXD.reshape(B, -1, 1, D), kpos_BKX.reshape(B, -1), self.rope_theta).reshape(k_BKXD.shape)
    o_slc = selected_attention_reference(q_BTHD, self._branch(k_BSJKD, 'slc'), self._branch(v_BSJKD, 'slc'),
                                         idx_BTKn, block_size=n.sel_block, qpos_BT=pos_BT,
                                         key_transform=rotate)
    S = self._branch(k_BSJKD, 'win').shape[1]
    span = min(S, n.window + T - 1)
    lo = jnp.clip(pos_BT[0, -1] + 1 - span, 0, S - span)  # the new tokens share their positions per row
    kpos_BL = jnp.broadcast_to(lo + jnp.arange(span), (B, span))
    kw_BLKD, vw_BLKD = (jax.lax.dynamic_slice_in_dim(self._branch(x, 'win'), lo, span, 1)
                        for x in (k_BSJKD, v_BSJKD))
    kw_BLKD = rope(kw_BLKD, kpos_BL, self.rope_theta)
    return o_slc, flash_attention_reference(q_BTHD, kw_BLKD, vw_BLKD, window=n.window, qpos_BT=pos_BT,
                                            kpos_BS=kpos_BL)

  def _extend_cache(self, k_BTJKD, v_BTJKD, start, cache: Cache) -> Cache:
    """Writes the new tokens' raw K/V, then (re)computes every compressed block that ends among them.

    The compressed blocks computed are a fixed number starting at the first one that can end in this
    call; blocks among them that are not complete yet hold placeholder values no query can see (their
    last token is in the future) and are recomputed when they complete.
    """
    l, stride = self.nsa.cmp_block, self.nsa.cmp_stride
    def write(bufs, new_BTJKD):
      return [jax.lax.dynamic_update_slice_in_dim(buf_BSKD, new_BTJKD[:, :, j].astype(self.dtype), start, 1)
              for j, buf_BSKD in enumerate(bufs)]
    k_BSJKD, v_BSJKD = write(cache['k'], k_BTJKD), write(cache['v'], v_BTJKD)
    C = cache['ck'].shape[1]
    if not C:
      return {'k': k_BSJKD, 'v': v_BSJKD, 'ck': cache['ck'], 'cv': cache['cv']}
    num_new = min((k_BTJKD.shape[1] - 1) // stride + 1, C)
    first = jnp.clip(-((l - 1 - start) // stride), 0, C - num_new)  # ceil((start - l + 1) / d)
    span = (num_new - 1) * stride + l

    def recompress(c_BCKD, buf_BSJKD, kind):
      raw_BXKD = jax.lax.dynamic_slice_in_dim(self._branch(buf_BSJKD, 'cmp'), first * stride, span, 1)
      return jax.lax.dynamic_update_slice_in_dim(c_BCKD, self._compress(raw_BXKD, num_new, kind), first, 1)
    return {'k': k_BSJKD, 'v': v_BSJKD, 'ck': recompress(cache['ck'], k_BSJKD, 'k'),
            'cv': recompress(cache['cv'], v_BSJKD, 'v')}

  def _mix(self, x_BTD, o_cmp, o_slc, o_win) -> jax.Array:
    """Eq. 5: per head, a sigmoid gate for each branch."""
    H = o_cmp.shape[2]
    logits_BTHJ = jnp.einsum('btd,dhj->bthj', x_BTD, self.w_gate[...].astype(self.dtype))
    g_BTHJ = jax.nn.sigmoid(logits_BTHJ + self.b_gate[...].astype(self.dtype).reshape(H, 3)[None, None])
    return g_BTHJ[..., 0:1] * o_cmp + g_BTHJ[..., 1:2] * o_slc + g_BTHJ[..., 2:3] * o_win
