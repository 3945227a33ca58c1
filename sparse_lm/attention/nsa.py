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

Context parallelism (`mesh.context`, sparse_lm/context.py): each device holds an early and a late chunk of
every row (c tokens each, a multiple of d). It runs phi on the compressed blocks that start in its chunks
(the last l - d rows of a block come from the next chunk's device) and all-gathers the results, so every
device holds the T/d compressed keys and values in the row's order; the compressed branch and block
selection then run for its own queries at their places in the row, with the gathered blocks' segments.
A query's selected blocks can be anywhere before it, so the selection branch's keys and values are
all-gathered (2 x T x Hkv x D values a layer, transient; a ring passing them, as dense attention's does,
would hold 1/C of that and is the next step). The window attends over each chunk with the w rows before
it, fetched from the devices that hold them. The compressed branch, block selection and the selected
branch run their chunked XLA references there (the kernels place queries at 0..T-1 only); the window runs
the flash kernel.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pallas_kernels.block_choice import segment_starts, select_blocks
from pallas_kernels.block_selection import block_selection, block_selection_reference
from pallas_kernels.compressed_attention import (
  block_ends,
  compressed_attention,
  compressed_attention_reference,
)
from pallas_kernels.flash_attention import attention_with_lse_reference, flash_attention
from pallas_kernels.selected_attention import selected_attention, selected_attention_reference
from sparse_lm import context, sharding
from sparse_lm.attention import base, kv_cache
from sparse_lm.errors import ConfigError, require_positive
from sparse_lm.layers import output_stddev, param, rope

Cache = dict[str, jax.Array]


class Attention(base.Attention):
  """NSA with grouped-query heads; `model.nsa` holds l, d, l', n, w and whether K/V are shared."""

  decodes = True
  segments = True
  context_parallel = True

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

  @classmethod
  def context_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    return cfg.nsa.cmp_stride  # each chunk computes the compressed blocks that start in it

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
    idx_NL = jnp.arange(num_blocks)[:, None] * stride + jnp.arange(l)[None, :]
    return _phi(raw_BXKD[:, idx_NL], *self._phi_weights(kind))

  def _phi_weights(self, kind: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(getattr(self, f'cmp_{name}_{kind}')[...].astype(self.dtype) for name in ('pos', 'w1', 'w2'))

  def _rotated_compressed(self, ck_BCKD, pos_BT, seg_BT=None) -> jax.Array:
    """Compressed keys rotated (RoPE) at their blocks' last tokens (at those tokens' positions in their
    documents under `seg_BT`)."""
    n = self.nsa
    ends_C = block_ends(ck_BCKD.shape[1], cmp_block=n.cmp_block, cmp_stride=n.cmp_stride)
    ends_BC = jnp.broadcast_to(ends_C, ck_BCKD.shape[:2]) if seg_BT is None else pos_BT[:, ends_C]
    return rope(ck_BCKD, ends_BC, self.rope_theta)

  def _compressed_and_choice(self, q_BTHD, ck_BCKD, cv_BCKD, pos_BT, num_keys: int, fused: bool,
                             seg_BT=None):
    """The compressed branch's output and the selected blocks over a whole sequence, from compressed
    keys not yet rotated; `fused`: the kernels, else the chunked XLA path. Also the rotated keys."""
    ck_BCKD = self._rotated_compressed(ck_BCKD, pos_BT, seg_BT)
    o_cmp, lse_BHT = self._compressed_branch(q_BTHD, ck_BCKD, cv_BCKD, pos_BT, seg_BT, fused)
    idx_BTKn = self._block_indices(q_BTHD, ck_BCKD, lse_BHT, pos_BT, seg_BT, num_keys, fused)
    return o_cmp, idx_BTKn, ck_BCKD

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

  def _branch(self, kv_BTJKD, name: str) -> jax.Array:
    """One branch's keys or values `[B, T, K, D]` (the one shared when J = 1)."""
    return kv_BTJKD[:, :, 0 if kv_BTJKD.shape[2] == 1 else ('cmp', 'slc', 'win').index(name)]

  # ------------------------------------------------------------------------- forward

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Cache | None = None, *, update_state: bool = False) -> tuple[jax.Array, Cache | None]:
    del update_state  # no state besides the parameters
    x_BTD = x_BTD.astype(self.dtype)
    q_BTHD, k_BTJKD, v_BTJKD = self._project(x_BTD, pos_BT)
    if cache is None and context.size() > 1:
      outs = self._split_sequence(q_BTHD, k_BTJKD, v_BTJKD, pos_BT, seg_BT)
    elif cache is None:
      outs, _ = self._sequence(q_BTHD, k_BTJKD, v_BTJKD, pos_BT, seg_BT)
    else:
      outs, cache = kv_cache.prefill_or_extend(pos_BT[0, 0], q_BTHD.shape[1], self._prefill, self._extend,
                                               q_BTHD, k_BTJKD, v_BTJKD, pos_BT, cache)
    o_BTHD = self._mix(x_BTD, *(o.astype(self.dtype) for o in outs))
    y_BTD = jnp.einsum('bthk,hkd->btd', o_BTHD, self.wo[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed')), cache

  def _sequence(self, q_BTHD, k_BTJKD, v_BTJKD, pos_BT, seg_BT=None):
    """The three branches over a whole sequence (training, or a prompt into an empty cache): the
    kernels when `model.kernel` is `pallas`. Also returns what a cache keeps of them: the rotated
    compressed keys and values and the rotated keys of the selection and window branches."""
    n = self.nsa
    fused = self.kernel == 'pallas'
    T = q_BTHD.shape[1]
    C = self._num_compressed(T)
    cv_BCKD = self._compress(self._branch(v_BTJKD, 'cmp'), C, 'v')
    o_cmp, idx_BTKn, ck_BCKD = self._compressed_and_choice(
        q_BTHD, self._compress(self._branch(k_BTJKD, 'cmp'), C, 'k'), cv_BCKD, pos_BT, T, fused, seg_BT)
    ks_BTKD = rope(self._branch(k_BTJKD, 'slc'), pos_BT, self.rope_theta)
    kw_BTKD = rope(self._branch(k_BTJKD, 'win'), pos_BT, self.rope_theta)
    vs_BTKD, vw_BTKD = self._branch(v_BTJKD, 'slc'), self._branch(v_BTJKD, 'win')
    implementation = 'pallas' if fused else 'xla'
    selected = functools.partial(selected_attention, block_size=n.sel_block, implementation=implementation)
    window = functools.partial(flash_attention, causal=True, window=n.window, implementation=implementation)
    # The selected blocks are the query's document's already (`block_selection`); the window keeps to
    # it by segment ids.
    o_slc = sharding.attention_per_device(selected, q_BTHD, ks_BTKD, vs_BTKD, idx_BTKn)
    if seg_BT is None:
      o_win = sharding.attention_per_device(window, q_BTHD, kw_BTKD, vw_BTKD)
    else:
      o_win = sharding.attention_per_device(lambda q, k, v, seg: window(q, k, v, segment_ids=seg),
                                            q_BTHD, kw_BTKD, vw_BTKD, seg_BT)
    return (o_cmp, o_slc, o_win), {'ck': ck_BCKD, 'cv': cv_BCKD, 'ks': ks_BTKD, 'kw': kw_BTKD}

  # ------------------------------------------------------------------------- context parallelism

  def _split_sequence(self, q_BTHD, k_BTJKD, v_BTJKD, pos_BT, seg_BT=None):
    """The three branches with each sequence split over the context axis, in its zigzag order (module
    docstring, "Context parallelism"): each device computes its own tokens' outputs."""
    C = context.size()
    ks_BTKD = rope(self._branch(k_BTJKD, 'slc'), pos_BT, self.rope_theta)
    kw_BTKD = rope(self._branch(k_BTJKD, 'win'), pos_BT, self.rope_theta)
    args = [q_BTHD, self._branch(k_BTJKD, 'cmp'), self._branch(v_BTJKD, 'cmp'), ks_BTKD,
            self._branch(v_BTJKD, 'slc'), kw_BTKD, self._branch(v_BTJKD, 'win'), pos_BT]
    if seg_BT is not None:
      args.append(seg_BT)
    out = (jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),) * 3
    return sharding.attention_per_device(functools.partial(self._share, C, seg_BT is not None), *args,
                                         split_length=True, out_shape=out,
                                         replicated=self._phi_weights('k') + self._phi_weights('v'))

  def _share(self, C: int, documents: bool, q_BLHD, rk_BLKD, rv_BLKD, ks_BLKD, vs_BLKD, kw_BLKD, vw_BLKD,
             pos_BL, *rest):
    """One device's share (L = 2c tokens: its early chunk, then its late one) under `shard_map`."""
    n = self.nsa
    l, d, w = n.cmp_block, n.cmp_stride, n.window
    seg_BL = rest[0] if documents else None
    phi_k, phi_v = rest[-6:-3], rest[-3:]
    B, L, H, D = q_BLHD.shape
    K, c = rk_BLKD.shape[2], L // 2
    T = 2 * C * c
    rows_L = context.natural_rows(C, c)
    rows_BL = jnp.broadcast_to(rows_L, (B, L))
    implementation = 'pallas' if self.kernel == 'pallas' else 'xla'
    # Compressed blocks: each chunk computes those that start in it (c / d, reaching l - d rows into the
    # next chunk), then every device gathers all of them (1 / d of the sequence) in the row's order.
    num_compressed = self._num_compressed(T)
    idx_NL = jnp.arange(c // d)[:, None] * d + jnp.arange(l)[None, :]

    def compressed(raw_BLKD, weights):
      ext_B2XKD = raw_BLKD.reshape(B, 2, c, K, D)
      if l > d:
        ext_B2XKD = jnp.concatenate([ext_B2XKD, context.neighbours(raw_BLKD, C, l - d, after=True)], axis=2)
      mine_BNKD = _phi(ext_B2XKD[:, :, idx_NL].reshape(B, 2 * (c // d), l, K, D), *weights)
      return context.gather_sequence(mine_BNKD, C)[:, :num_compressed]
    pos_BT = seg_BT = starts_BL = block_seg = None
    if documents:
      pos_BT, seg_BT = context.gather_sequence(pos_BL, C), context.gather_sequence(seg_BL, C)
      starts_BL = segment_starts(seg_BT)[:, rows_L]
      block_seg = (seg_BL, seg_BT[:, :num_compressed * d:d])
    ck_BCKD = self._rotated_compressed(compressed(rk_BLKD, phi_k), pos_BT, seg_BT)
    cv_BCKD = compressed(rv_BLKD, phi_v)
    # Eq. 8 and Eqs. 9-11 for this device's queries at their places in the row.
    o_cmp, lse_BHL = attention_with_lse_reference(q_BLHD, ck_BCKD, cv_BCKD, causal=True,
                                                  key_positions=(d, l - 1), qpos_BT=rows_BL,
                                                  segment_ids=block_seg)
    sg = jax.lax.stop_gradient
    idx_BLKn = block_selection_reference(
        sg(q_BLHD), sg(ck_BCKD), sg(lse_BHL), cmp_block=l, cmp_stride=d, sel_block=n.sel_block,
        num_selected=n.num_selected, pos_BT=rows_BL, num_blocks=-(-T // n.sel_block), starts_BT=starts_BL)
    # Eq. 12: the chosen blocks may be anywhere before the query, so the selection branch's keys and
    # values are gathered whole.
    o_slc = selected_attention_reference(q_BLHD, context.gather_sequence(ks_BLKD, C),
                                         context.gather_sequence(vs_BLKD, C), idx_BLKn,
                                         block_size=n.sel_block, qpos_BT=rows_BL)
    # The window: each chunk with the w rows before it (its halo, from the devices holding them) as
    # self-attention over w + c rows, the halo's rows as queries too (dropped), so the window kernel
    # runs unchanged; a halo before the row's start is a segment of its own (-1), seen by nothing.
    own_BL = jnp.ones((B, L), jnp.int32) if seg_BL is None else seg_BL
    halo_seg = context.neighbours(own_BL, C, w, after=False)
    starts = (rows_L[0], rows_L[c])
    halo_seg = jnp.stack([jnp.where(a - w + jnp.arange(w) >= 0, halo_seg[:, i], -1)
                          for i, a in enumerate(starts)], axis=1)
    halos = [context.neighbours(x, C, w, after=False) for x in (kw_BLKD, vw_BLKD)]
    window = functools.partial(flash_attention, causal=True, window=w, implementation=implementation)
    o_win = []
    for i in range(2):
      part = slice(i * c, (i + 1) * c)
      q_BXHD = jnp.concatenate([jnp.zeros((B, w, H, D), q_BLHD.dtype), q_BLHD[:, part]], axis=1)
      k_BXKD, v_BXKD = (jnp.concatenate([halo[:, i], x[:, part]], axis=1)
                        for halo, x in zip(halos, (kw_BLKD, vw_BLKD), strict=True))
      o_win.append(window(q_BXHD, k_BXKD, v_BXKD,
                          segment_ids=jnp.concatenate([halo_seg[:, i], own_BL[:, part]], axis=1))[:, w:])
    return o_cmp, o_slc, jnp.concatenate(o_win, axis=1)

  # ------------------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int) -> Cache:
    """What decoding reads, and no more: the selection branch's rotated keys and values, one row a
    position (any block may be chosen); the compressed keys (rotated) and values, one a `cmp_stride`;
    the compression branch's raw rows only for the last `cmp_block` positions (a ring: a block is
    compressed once, when its last token arrives); and, with separate branch K/V, the window branch's
    last `window` rows (a ring). With `nsa.shared_kv` the window reads the selection branch's rows.
    At 65,536 positions and the paper's sizes that is 1.07x dense attention's cache, against 3.06x
    for three branches' full K/V."""
    _, J, K, D = self.wk.shape
    n = self.nsa

    def rows(length):
      return jnp.zeros((batch, length, K, D), self.dtype)
    C = self._num_compressed(max_len)
    cache = {'k': rows(max_len), 'v': rows(max_len), 'ck': rows(C), 'cv': rows(C),
             'rk': rows(min(n.cmp_block, max_len)), 'rv': rows(min(n.cmp_block, max_len))}
    if J > 1:
      cache.update(wk=rows(min(n.window, max_len)), wv=rows(min(n.window, max_len)))
    return cache

  def _prefill(self, q_BTHD, k_BTJKD, v_BTJKD, pos_BT, cache: Cache):
    """A prompt into an empty cache: the whole-sequence path, then its pieces written to the cache."""
    outs, got = self._sequence(q_BTHD, k_BTJKD, v_BTJKD, pos_BT)
    start = pos_BT[0, 0]
    new = {'k': kv_cache.write_rows(cache['k'], got['ks'], start),
           'v': kv_cache.write_rows(cache['v'], self._branch(v_BTJKD, 'slc'), start),
           'ck': kv_cache.write_rows(cache['ck'], got['ck'], start),
           'cv': kv_cache.write_rows(cache['cv'], got['cv'], start),
           'rk': kv_cache.ring_write(cache['rk'], self._branch(k_BTJKD, 'cmp'), pos_BT),
           'rv': kv_cache.ring_write(cache['rv'], self._branch(v_BTJKD, 'cmp'), pos_BT)}
    if 'wk' in cache:
      new.update(wk=kv_cache.ring_write(cache['wk'], got['kw'], pos_BT),
                 wv=kv_cache.ring_write(cache['wv'], self._branch(v_BTJKD, 'win'), pos_BT))
    return outs, new

  def _extend(self, q_BTHD, k_BTJKD, v_BTJKD, pos_BT, cache: Cache):
    """New tokens after the cached ones (one, when decoding), reading only what they attend to: the
    compressed blocks, the rows of the chosen blocks (gathered) and the window's rows. The compressed
    blocks and the rings are read before they are written (`kv_cache.after`), which keeps their
    updates in place."""
    n = self.nsa
    start, S, C = pos_BT[0, 0], cache['k'].shape[1], cache['ck'].shape[1]
    qpos_BT1 = pos_BT[:, :, None]
    # Eq. 8 over the blocks that ended before these tokens and those that end among them (computed
    # here), then Eqs. 9-11 from the same probabilities (Eq. 10 sums a group's heads).
    ck_BNKD, cv_BNKD, index_N, rings = self._new_compressed(k_BTJKD, v_BTJKD, pos_BT, cache)
    ends_C = block_ends(C, cmp_block=n.cmp_block, cmp_stride=n.cmp_stride)
    ends_N = index_N * n.cmp_stride + n.cmp_block - 1
    keep_BTC = (ends_C[None, None, :] <= qpos_BT1) & (ends_C < start)[None, None, :]
    keep_BTN = jnp.broadcast_to(ends_N[None, None, :] <= qpos_BT1, (*pos_BT.shape, len(ends_N)))
    o_cmp, p_BCTK, p_BNTK = kv_cache.attend(q_BTHD, cache['ck'], cache['cv'], keep_BTC,
                                            new=(ck_BNKD, cv_BNKD, keep_BTN), probabilities=True)
    p_BCTK = p_BCTK.at[:, index_N].add(p_BNTK, mode='drop')
    idx_BTKn = select_blocks(self._selection_scores(p_BCTK, -(-S // n.sel_block)), pos_BT,
                             num_selected=n.num_selected, block_size=n.sel_block, force_first=True,
                             force_local=2)
    cache = {**cache, **rings,
             'ck': cache['ck'].at[:, index_N].set(kv_cache.after(ck_BNKD, o_cmp, p_BCTK), mode='drop'),
             'cv': cache['cv'].at[:, index_N].set(kv_cache.after(cv_BNKD, o_cmp, p_BCTK), mode='drop')}
    # Eq. 12 over the chosen blocks' rows, gathered from the cache once the new rows are in it.
    ks_BTKD = rope(self._branch(k_BTJKD, 'slc'), pos_BT, self.rope_theta)
    cache['k'] = kv_cache.write_rows(cache['k'], ks_BTKD, start)
    cache['v'] = kv_cache.write_rows(cache['v'], self._branch(v_BTJKD, 'slc'), start)
    if pos_BT.shape[1] == 1:
      o_slc = kv_cache.attend_blocks(q_BTHD, cache['k'], cache['v'], idx_BTKn, block_size=n.sel_block,
                                     pos_BT=pos_BT)
    else:
      o_slc = selected_attention_reference(q_BTHD, cache['k'], cache['v'], idx_BTKn, block_size=n.sel_block,
                                           qpos_BT=pos_BT)
    if 'wk' in cache:  # the window branch's own rows, in its ring
      kw_BTKD = rope(self._branch(k_BTJKD, 'win'), pos_BT, self.rope_theta)
      o_win, cache['wk'], cache['wv'] = kv_cache.window_attend(
          q_BTHD, cache['wk'], cache['wv'], kw_BTKD, self._branch(v_BTJKD, 'win'), pos_BT, n.window)
    else:  # shared K/V: the last `window + T - 1` rows of the selection branch's
      B, T = pos_BT.shape
      span = min(S, n.window + T - 1)
      lo = jnp.clip(pos_BT[0, -1] + 1 - span, 0, S - span)
      kpos_11X = (lo + jnp.arange(span))[None, None, :]
      kw_BXKD, vw_BXKD = (jax.lax.dynamic_slice_in_dim(cache[name], lo, span, 1) for name in ('k', 'v'))
      keep_BTX = (kpos_11X <= qpos_BT1) & (kpos_11X > qpos_BT1 - n.window)
      o_win = kv_cache.attend(q_BTHD, kw_BXKD, vw_BXKD, keep_BTX)
    return (o_cmp, o_slc, o_win), cache

  def _selection_scores(self, p_BCTK, num_blocks: int) -> jax.Array:
    """Eq. 9 for a few tokens, from probabilities laid out blocks first `[B, C, T, K]` (as decoding's
    scores are). Selection block j covers stride units `j m .. j m + m - 1` (m = l' / d), and unit u is
    covered by compressed blocks `u - cover + 1 .. u` (cover = l / d): so block j weighs the compressed
    blocks from `j m - cover + 1` on, a window of `m + cover - 1`, by how many of its units each covers.
    With the probabilities padded by `cover - 1` in front and cut into rows of m, that window is row j
    and the first `cover - 1` of row j + 1: two weighted sums over rows, blocks last. Returns
    `[B, T, K, num_blocks]`."""
    n = self.nsa
    cover, m = n.cmp_block // n.cmp_stride, n.sel_block // n.cmp_stride
    weights = np.convolve(np.ones(m), np.ones(cover))  # the window's weights: 1, 2, ..., 2, 1
    span = len(weights)
    shifts = -(-span // m)  # rows the window reaches
    B, C, T, K = p_BCTK.shape
    rows = num_blocks + shifts - 1
    padded_BTKX = jnp.pad(p_BCTK.transpose(0, 2, 3, 1),
                          ((0, 0), (0, 0), (0, 0), (cover - 1, max(0, rows * m - C - cover + 1))))
    r_BTKRM = padded_BTKX[..., :rows * m].reshape(B, T, K, rows, m)
    score_BTKN = 0
    for o in range(shifts):  # row j + o holds the window's weights o m .. o m + m - 1
      width = min(m, span - o * m)
      score_BTKN += jnp.einsum('btknm,m->btkn', r_BTKRM[:, :, :, o:o + num_blocks, :width],
                               jnp.asarray(weights[o * m:o * m + width], p_BCTK.dtype))
    return score_BTKN

  def _new_compressed(self, k_BTJKD, v_BTJKD, pos_BT, cache: Cache):
    """The compressed blocks that end among the new tokens (keys rotated at their last token), their
    indices `[N]`, and the raw rings with the new tokens written: phi on the ring's last rows and the
    new ones.

    A fixed number N of blocks is computed, from the first that can end among the new tokens; those
    that do not end yet are placeholders no query sees (their last token is in the future), computed
    again when they end. Indices past the cache's last block are dropped when written."""
    l, stride = self.nsa.cmp_block, self.nsa.cmp_stride
    start, (B, T) = pos_BT[0, 0], pos_BT.shape
    C, R = cache['ck'].shape[1], cache['rk'].shape[1]
    N = max(1, min((T - 1) // stride + 1, C))
    first = jnp.maximum(-((l - 1 - start) // stride), 0)  # ceil((start - l + 1) / d): ends at >= start
    span = (N - 1) * stride + l
    # The raw rows at positions start - R .. start + T - 1, then zeros for the placeholders' missing rows.
    order_R = (start - R + jnp.arange(R)) % R
    offset = first * stride - (start - R)
    index_N = first + jnp.arange(N)
    ends_BN = jnp.broadcast_to(index_N * stride + l - 1, (B, N))
    ends = ends_BN[0, 0] == start  # (one token) the block ending there is computed, else a placeholder
    new, rings = {}, {}
    for kind, kv_BTJKD in (('k', k_BTJKD), ('v', v_BTJKD)):
      raw_BTKD = self._branch(kv_BTJKD, 'cmp')
      ring_BRKD = cache[f'r{kind}']
      raw_BXKD = jnp.concatenate([ring_BRKD[:, order_R], raw_BTKD.astype(self.dtype),
                                  jnp.zeros((B, span, *raw_BTKD.shape[2:]), self.dtype)], axis=1)
      raw_BXKD = jax.lax.dynamic_slice_in_dim(raw_BXKD, offset, span, 1)
      if T == 1:  # a block ends at one token in d: phi runs then, and its weights are read then
        c_BNKD = jax.lax.cond(ends, functools.partial(self._compress, num_blocks=N, kind=kind),
                              lambda x: jnp.zeros((B, N, *x.shape[2:]), self.dtype), raw_BXKD)
      else:
        c_BNKD = self._compress(raw_BXKD, N, kind)
      new[kind] = (rope(c_BNKD, ends_BN, self.rope_theta) if kind == 'k' else c_BNKD).astype(self.dtype)
      rings[f'r{kind}'] = kv_cache.ring_write(ring_BRKD, kv_cache.after(raw_BTKD, raw_BXKD), pos_BT)
    return new['k'], new['v'], index_N, rings

  def _mix(self, x_BTD, o_cmp, o_slc, o_win) -> jax.Array:
    """Eq. 5: per head, a sigmoid gate for each branch."""
    H = o_cmp.shape[2]
    logits_BTHJ = jnp.einsum('btd,dhj->bthj', x_BTD, self.w_gate[...].astype(self.dtype))
    g_BTHJ = jax.nn.sigmoid(logits_BTHJ + self.b_gate[...].astype(self.dtype).reshape(H, 3)[None, None])
    return g_BTHJ[..., 0:1] * o_cmp + g_BTHJ[..., 1:2] * o_slc + g_BTHJ[..., 2:3] * o_win


def _phi(blocks_BNLKD: jax.Array, pos_LD: jax.Array, w1_XF: jax.Array, w2_FD: jax.Array) -> jax.Array:
  """Eq. 7's phi on blocks of l raw rows: the position-in-block encoding added, the block flattened per
  kv head, then the two-layer MLP. `[B, N, K, D]`."""
  B, N, l, K, D = blocks_BNLKD.shape
  x_BNKX = (blocks_BNLKD + pos_LD[None, None, :, None, :]).transpose(0, 1, 3, 2, 4).reshape(B, N, K, l * D)
  return jax.nn.silu(x_BNKX @ w1_XF) @ w2_FD
