"""NSA block selection (Eqs. 9-11): the chunked XLA reference against the unchunked helpers and a per-token
loop, both kernel bodies (interpreted, the TPU one under InterpretParams) against the reference, no gradient,
and lowering for cuda and tpu (the compiled kernels are in test_compile.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_choice import select_blocks
from pallas_kernels.block_selection import (
  block_selection,
  block_selection_reference,
  computed_tiles,
  selection_scores,
)
from pallas_kernels.compressed_attention import compressed_attention_reference

jax.config.update('jax_numpy_rank_promotion', 'raise')

PAPER = (32, 16, 64)  # (cmp_block, cmp_stride, sel_block) of NSA Sec. 4.1
# Tolerance for a near-tie: scores within it may be ordered differently by float rounding.
NEAR = 1e-5


def _seed() -> int:
  return int(np.random.default_rng().integers(1 << 31))


def _rule(blocks, n):
  l, d, ls = blocks
  return dict(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n)


def _logits(q, ck, D):
  B, T, H, _ = q.shape
  K = ck.shape[2]
  q_BTKGD = q.reshape(B, T, K, H // K, D).astype(jnp.float32)
  return jnp.einsum('btkgd,bckd->bkgtc', q_BTKGD, ck.astype(jnp.float32), precision='highest') * D**-0.5


def _visible(C, pos_BT, l, d):
  return jnp.arange(C)[None, None, :] * d + l - 1 <= pos_BT[:, :, None]


def _reference(q, ck, lse, blocks, n, **options):
  return jax.jit(functools.partial(block_selection_reference, **_rule(blocks, n), **options))(q, ck, lse)


def _inputs(rng, B, T, H, K, D, blocks, dtype, pos_BT=None, keys=None):
  """Random q and ck ([B, (keys - l) // d + 1, K, D] for `keys` tokens, default T), and the lse honestly
  computed from them (float32, on the rounded inputs): logsumexp over the visible blocks, -inf for none."""
  l, d, _ = blocks
  C = max(0, ((keys or T) - l) // d + 1)
  q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
  ck = jnp.asarray(rng.standard_normal((B, C, K, D)), dtype)
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if pos_BT is None else pos_BT
  visible_B11TC = _visible(C, pos_BT, l, d)[:, None, None]
  lse_BKGT = jax.jit(lambda s: jax.nn.logsumexp(jnp.where(visible_B11TC, s, -jnp.inf), axis=-1))(
      jax.jit(_logits, static_argnums=2)(q, ck, D))
  return q, ck, lse_BKGT.reshape(B, H, T)


@functools.partial(jax.jit, static_argnames=('blocks', 'n', 'num_blocks'))
def _dense(q, ck, lse, blocks, n, pos_BT=None, num_blocks=None):
  """The unchunked rule: the whole [B, K, G, T, C] probabilities, then the Eq. 9 and Eq. 11 helpers.
  Returns the scores [B, T, K, S] and the selection."""
  l, d, ls = blocks
  B, T, H, D = q.shape
  C, K = ck.shape[1:3]
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T)) if pos_BT is None else pos_BT
  S = num_blocks or -(-T // ls)
  lse_BKGT1 = lse.reshape(B, K, H // K, T)[..., None]
  visible = _visible(C, pos_BT, l, d)[:, None, None] & (lse_BKGT1 > -jnp.inf)
  p_BKGTC = jnp.where(visible, jnp.exp(_logits(q, ck, D) - lse_BKGT1), 0.0)
  score_BKTS = selection_scores(p_BKGTC.sum(2), S, cmp_block=l, cmp_stride=d, sel_block=ls)
  score_BTKS = score_BKTS.transpose(0, 2, 1, 3)
  return score_BTKS, select_blocks(score_BTKS, pos_BT, num_selected=n, block_size=ls)


def _ranked(score_BTKS, pos_BT, sel_block):
  """The scores as Eq. 11 ranks them: forced +inf, blocks starting after the token -inf."""
  score, pos = np.asarray(score_BTKS, np.float64), np.asarray(pos_BT)[:, :, None, None]
  j = np.arange(score.shape[-1])
  valid = j * sel_block <= pos
  forced = valid & ((j == 0) | (j == pos // sel_block) | (j == pos // sel_block - 1))
  return np.where(forced, np.inf, np.where(valid, score, -np.inf))


def _assert_same_selection(got, want, score_BTKS, sel_block, context, pos_BT=None):
  """Exactly equal rows where the reference's top n+1 ranked scores hold no near-tie (the structural
  ties, forced blocks and exact zeros, are exact); the same sets where a near-tie lies inside the top n
  only; the rest (a near-tie at the n-th place) skipped, and rare."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == np.int32, (got.shape, want.shape, got.dtype)
  B, T = got.shape[:2]
  n = got.shape[-1]
  pos_BT = np.broadcast_to(np.arange(T), (B, T)) if pos_BT is None else pos_BT
  ranked = -np.sort(-_ranked(score_BTKS, pos_BT, sel_block), axis=-1)[..., :n + 1]
  a, b = ranked[..., :-1], ranked[..., 1:]
  finite = np.isfinite(a) & np.isfinite(b)
  gap = np.abs(np.where(finite, a, 0.0) - np.where(finite, b, 0.0))
  near = finite & (gap <= NEAR * np.maximum(1.0, np.abs(np.where(finite, a, 0.0)))) & ~((a == 0) & (b == 0))
  exact = ~near.any(-1)
  np.testing.assert_array_equal(got[exact], want[exact], err_msg=context)
  boundary_clear = ~near[..., n - 1] if ranked.shape[-1] > n else np.ones(exact.shape, bool)
  sets = ~exact & boundary_clear
  np.testing.assert_array_equal(np.sort(got[sets], -1), np.sort(want[sets], -1), err_msg=context)
  assert (~exact & ~boundary_clear).mean() < 0.01, f'too many near-ties to compare ({context})'


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize('T,H,K,blocks,n,dtype', [
    (200, 4, 1, PAPER, 3, jnp.float32),
    (333, 6, 2, (16, 8, 32), 16, jnp.bfloat16),
    (150, 4, 2, (64, 16, 32), 3, jnp.float32),  # l > l': compressed blocks cover units of two blocks
    (20, 2, 1, PAPER, 3, jnp.float32),  # T < l: no compressed block
])
def test_reference_chunks_match_dense(T, H, K, blocks, n, dtype):
  seed = _seed()
  q, ck, lse = _inputs(np.random.default_rng(seed), 2, T, H, K, 16, blocks, dtype)
  score_BTKS, want = _dense(q, ck, lse, blocks, n)
  got = _reference(q, ck, lse, blocks, n, chunk=64)
  _assert_same_selection(got, want, score_BTKS, blocks[2], f'{seed=}')


def test_reference_at_decoding_positions():
  """Queries at arbitrary positions of a longer key sequence (`pos_BT`, `num_blocks`), as decoding has."""
  seed = _seed()
  rng = np.random.default_rng(seed)
  blocks, n, keys = PAPER, 3, 333
  pos_BT = jnp.asarray([[332, 100, 0, 255, 64, 31], [63, 64, 300, 2, 190, 128]])
  q, ck, lse = _inputs(rng, 2, 6, 4, 2, 16, blocks, jnp.float32, pos_BT=pos_BT, keys=keys)
  S = -(-keys // blocks[2])
  score_BTKS, want = _dense(q, ck, lse, blocks, n, pos_BT=pos_BT, num_blocks=S)
  got = _reference(q, ck, lse, blocks, n, pos_BT=pos_BT, num_blocks=S, chunk=4)
  assert got.shape == (2, 6, 2, n)
  _assert_same_selection(got, want, score_BTKS, blocks[2], f'{seed=}', pos_BT=np.asarray(pos_BT))


def _loop_selection(q, ck, lse, blocks, n):
  """Per token and kv head in float64: probabilities of the visible compressed blocks, summed over the
  group, Eq. 9 from the units, then the forced blocks by index and the other valid ones by score."""
  l, d, ls = blocks
  q, ck, lse = (np.asarray(x, np.float64) for x in (q, ck, lse))
  B, T, H, D = q.shape
  C, K = ck.shape[1:3]
  G, S = H // K, -(-T // ls)
  out, score = [], np.zeros((B, T, K, S))
  for b, t, k in np.ndindex(B, T, K):
    p_C = np.zeros(C)
    for h in range(k * G, (k + 1) * G):
      for i in range(C):
        if i * d + l - 1 <= t:
          p_C[i] += np.exp(q[b, t, h] @ ck[b, i, k] / np.sqrt(D) - lse[b, h, t])
    for j in range(S):
      score[b, t, k, j] = sum(p_C[u - m] for u in range(j * ls // d, (j + 1) * ls // d) for m in range(l // d)
                              if 0 <= u - m < C)
    valid = [j for j in range(S) if j * ls <= t]
    forced = {0, t // ls, t // ls - 1} & set(valid)
    others = sorted(set(valid) - forced, key=lambda j, s_S=score[b, t, k]: (-s_S[j], j))
    best = (sorted(forced) + others)[:min(n, S)]
    out.append(best + [-1] * (min(n, S) - len(best)))
  return np.asarray(out, np.int32).reshape(B, T, K, min(n, S)), score


def test_reference_and_kernel_match_per_token_loop():
  seed = _seed()
  blocks, n = (16, 8, 32), 3
  q, ck, lse = _inputs(np.random.default_rng(seed), 1, 150, 4, 2, 8, blocks, jnp.float32)
  want, score = _loop_selection(q, ck, lse, blocks, n)
  kernel = functools.partial(block_selection, backend='gpu', interpret=True, block_q=16, block_s=2,
                             **_rule(blocks, n))
  for name, got in [('reference', _reference(q, ck, lse, blocks, n, chunk=64)),
                    ('gpu kernel', jax.jit(kernel)(q, ck, lse))]:
    _assert_same_selection(got, want, score, blocks[2], f'{name} {seed=}')


# ----------------------------------------------------------------------------- kernels


# (backend, T, H, K, blocks, n, dtype, block_q, block_s): T not a multiple of the blocks; groups 1, 3, 4;
# tiles of a few selection blocks so the Eq. 9 carry crosses tiles; None = the backend's defaults.
CASES = [
    ('gpu', 200, 4, 1, PAPER, 3, jnp.float32, 16, 2),
    ('gpu', 333, 6, 2, (16, 8, 32), 16, jnp.bfloat16, 32, 4),
    ('gpu', 333, 2, 2, (16, 8, 32), 3, jnp.float32, 16, 4),
    ('gpu', 333, 8, 2, PAPER, 16, jnp.bfloat16, None, None),
    ('gpu', 150, 4, 2, (64, 16, 32), 3, jnp.float32, 16, 2),
    ('gpu', 20, 4, 2, PAPER, 3, jnp.float32, 16, 2),  # T < l: no compressed block
    ('tpu', 200, 6, 2, PAPER, 3, jnp.float32, 128, 2),
    ('tpu', 333, 4, 1, (16, 8, 32), 16, jnp.bfloat16, 128, 8),
    ('tpu', 333, 8, 2, PAPER, 16, jnp.bfloat16, None, None),
    ('tpu', 150, 2, 2, (64, 16, 32), 3, jnp.float32, 128, 2),
    ('tpu', 20, 2, 2, PAPER, 3, jnp.float32, 128, 8),
]


@pytest.mark.parametrize('backend,T,H,K,blocks,n,dtype,block_q,block_s', CASES)
def test_kernel_matches_reference(backend, T, H, K, blocks, n, dtype, block_q, block_s):
  seed = _seed()
  q, ck, lse = _inputs(np.random.default_rng(seed), 2, T, H, K, 16, blocks, dtype)
  kernel = functools.partial(block_selection, backend=backend, interpret=True, block_q=block_q,
                             block_s=block_s, **_rule(blocks, n))
  got = jax.jit(kernel)(q, ck, lse)
  want = _reference(q, ck, lse, blocks, n, chunk=128)
  score_BTKS, _ = _dense(q, ck, lse, blocks, n)
  _assert_same_selection(got, want, score_BTKS, blocks[2], f'{backend} {seed=}')


@pytest.mark.parametrize('backend,block_q,block_s', [('gpu', 32, 2), ('gpu', 64, 16), ('tpu', 128, 2)])
def test_kernel_with_segments_matches_reference_and_each_document_alone(backend, block_q, block_s):
  """Documents on the selection grid (64, 32, 352 and 64 tokens; two halves in row 1): the kernels
  (skipping earlier documents' tiles, tiles of two blocks so the Eq. 9 carry crosses them) choose what
  the reference chooses, and a document chooses the blocks it chooses alone, shifted by its start."""
  l, d, ls, n = 8, 4, 16, 4
  lengths = ((64, 32, 352, 64), (256, 256))
  seg = jnp.asarray(np.stack([np.repeat(np.arange(1, len(x) + 1), x) for x in lengths]), jnp.int32)
  rng = np.random.default_rng(_seed())
  T, C = 512, (512 - l) // d + 1
  q, ck, cv = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, T, 4, 16), (2, C, 2, 16),
                                                                            (2, C, 2, 16)))
  rule = dict(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=n)
  _, lse = compressed_attention_reference(q, ck, cv, cmp_block=l, cmp_stride=d, segment_ids=seg)
  want = np.asarray(block_selection_reference(q, ck, lse, segment_ids=seg, **rule))
  kernel = functools.partial(block_selection, backend=backend, interpret=True, block_q=block_q,
                             block_s=block_s, segment_ids=seg, **rule)
  got = np.asarray(jax.jit(kernel)(q, ck, lse))
  np.testing.assert_array_equal(got, want)
  for a, m in ((96, 352), (0, 64)):
    span = slice(a // d, a // d + (m - l) // d + 1)
    _, lse_alone = compressed_attention_reference(q[:1, a:a + m], ck[:1, span], cv[:1, span], cmp_block=l,
                                                  cmp_stride=d)
    alone = np.asarray(block_selection_reference(q[:1, a:a + m], ck[:1, span], lse_alone, **rule))[0]
    np.testing.assert_array_equal(np.where(alone >= 0, alone + a // ls, -1), want[0, a:a + m])
  assert ((want[0, 96:448] >= 96 // ls) | (want[0, 96:448] == -1)).all()  # none of the earlier documents


def test_no_gradient_flows():
  """The indices carry no gradient: differentiating through them gives zeros (and needs no kernel JVP),
  with the body chosen by the platform lowered for (here the CPU: the GPU body interpreted)."""
  q, ck, lse = _inputs(np.random.default_rng(0), 1, 64, 2, 1, 16, (16, 8, 32), jnp.float32)

  def loss(q, ck, lse):
    return block_selection(q, ck, lse, **_rule((16, 8, 32), 3)).astype(jnp.float32).sum()
  for g in jax.grad(loss, argnums=(0, 1, 2))(q, ck, lse):
    assert not np.any(np.asarray(g))


def test_xla_implementation_is_the_reference():
  q, ck, lse = _inputs(np.random.default_rng(1), 1, 100, 4, 2, 16, PAPER, jnp.float32)
  xla = functools.partial(block_selection, implementation='xla', **_rule(PAPER, 3))
  np.testing.assert_array_equal(jax.jit(xla)(q, ck, lse), _reference(q, ck, lse, PAPER, 3))


@pytest.mark.parametrize('backend,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_lowers_for_each_platform(backend, platform):
  B, T, H, K, D = 1, 1024, 8, 2, 128
  q = jnp.zeros((B, T, H, D), jnp.bfloat16)
  ck = jnp.zeros((B, (T - 32) // 16 + 1, K, D), jnp.bfloat16)
  lse = jnp.zeros((B, H, T), jnp.float32)
  f = functools.partial(block_selection, backend=backend, interpret=False, **_rule(PAPER, 16))
  jax.jit(f).trace(q, ck, lse).lower(lowering_platforms=(platform,))


def test_shape_errors():
  q, ck, lse = jnp.zeros((1, 64, 4, 16)), jnp.zeros((1, 3, 2, 16)), jnp.zeros((1, 4, 64))
  with pytest.raises(ValueError, match='lse'):
    block_selection(q, ck, lse[:, :2], **_rule(PAPER, 3))
  with pytest.raises(ValueError, match='divide'):
    block_selection(q, ck, lse, cmp_block=32, cmp_stride=12, sel_block=64, num_selected=3)
  with pytest.raises(ValueError, match='powers of two'):
    block_selection(q, ck, lse, backend='gpu', interpret=False, block_q=24, **_rule(PAPER, 3))
  with pytest.raises(ValueError, match='multiple of 128'):
    block_selection(q, ck, lse, backend='tpu', interpret=False, block_q=64, **_rule(PAPER, 3))


def test_kernel_skips_the_tiles_of_earlier_documents():
  """Sixteen 512-token documents at T=8,192 (64 queries x 16 selection blocks of 64 a tile): each query
  block visits only its own document's tile, 128 steps, against sum over blocks of (i // 16 + 1) = 576
  for one document."""
  seg = jnp.asarray(np.repeat(np.arange(1, 17), 512)[None], jnp.int32)
  tiles = functools.partial(computed_tiles, 8192, block_q=64, block_s=16, sel_block=64)
  assert tiles() == 576
  assert tiles(segment_ids=seg) == 128
