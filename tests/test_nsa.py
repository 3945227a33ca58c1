"""Native Sparse Attention: block scoring and top-n against a per-token reference of Eqs. 8-12,
causality, incremental decoding, the kernel path against the XLA path, and a short training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_selection import selection_scores
from sparse_lm.attention import nsa
from sparse_lm.layers import rope
from sparse_lm.model import Transformer
from tests.conftest import assert_decoding_equals_parallel, fresh_seed, run_train, tiny_config, train_losses

SMALL_NSA = nsa.Attention.tiny_config()['nsa']


def _nsa_config(kernel='xla', **nsa_overrides):
  c = tiny_config(attention='nsa', kernel=kernel)
  c.model.nsa.update({**SMALL_NSA, **nsa_overrides})
  return c


def reference_selection(q_TGD, ck_CD, t, *, l, d, sel, n, theta):
  """Eqs. 8-12 for one token and one kv group, written from the paper's definitions."""
  C = ck_CD.shape[0]
  visible = [i for i in range(C) if i * d + l - 1 <= t]
  p_GC = np.zeros((q_TGD.shape[0], C))
  if visible:
    ends = jnp.asarray([[i * d + l - 1 for i in visible]])
    k_VD = np.asarray(rope(jnp.asarray(ck_CD[visible])[None, :, None, :], ends, theta))[0, :, 0]
    s_GV = q_TGD @ k_VD.T / np.sqrt(q_TGD.shape[-1])
    e_GV = np.exp(s_GV - s_GV.max(-1, keepdims=True))
    p_GC[:, visible] = e_GV / e_GV.sum(-1, keepdims=True)               # Eq. 8
  p_C = p_GC.sum(0)                                                      # Eq. 10
  num_sel = -(-(t + 1) // sel)                                           # blocks starting at or before t
  score = np.zeros(num_sel)
  for j in range(num_sel):                                               # Eq. 9: overlap in stride units
    for i in range(C):
      overlap = len(set(range(i, i + l // d)) & set(range(j * sel // d, (j + 1) * sel // d)))
      score[j] += overlap * p_C[i]
  forced = {0, t // sel, t // sel - 1} & set(range(num_sel))
  order = sorted(range(num_sel), key=lambda j: (j not in forced, -score[j], j))   # Eq. 11
  return set(order[:n])


@pytest.mark.parametrize('kernel', ['xla', 'pallas'])
@pytest.mark.parametrize('l,d,sel,n', [(4, 2, 4, 3), (8, 4, 4, 4), (4, 4, 8, 3)])
def test_block_choice_matches_per_token_reference(l, d, sel, n, kernel):
  c = _nsa_config(kernel, cmp_block=l, cmp_stride=d, sel_block=sel, num_selected=n)
  layer = nsa.Attention(c.model, rngs=nnx.Rngs(fresh_seed()))
  B, T, H, K, D = 1, 27, 4, 2, 16
  rng = np.random.default_rng(fresh_seed())
  q_BTHD = rng.standard_normal((B, T, H, D)).astype(np.float32)
  C = layer._num_compressed(T)
  ck_BCKD = rng.standard_normal((B, C, K, D)).astype(np.float32)
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))

  @jax.jit
  def block_indices(q_BTHD, ck_BCKD):
    return layer._compressed_and_choice(q_BTHD, ck_BCKD, ck_BCKD, pos_BT, T, kernel == 'pallas')[1]
  idx_BTKn = np.asarray(block_indices(jnp.asarray(q_BTHD), jnp.asarray(ck_BCKD)))
  for t in range(T):  # includes t < l, where no compressed block is visible yet
    for k in range(K):
      q_GD = q_BTHD[0, t, k * (H // K):(k + 1) * (H // K)]
      want = reference_selection(q_GD, ck_BCKD[0, :, k], t, l=l, d=d, sel=sel, n=n, theta=10_000.0)
      got = {int(j) for j in idx_BTKn[0, t, k] if j >= 0}
      assert got == want, (t, k, got, want)
      assert all(j * sel <= t for j in got)


@pytest.mark.parametrize('kernel', ['xla', 'pallas'])
def test_compressed_branch_is_zero_before_the_first_block_completes(kernel):
  c = _nsa_config(kernel, cmp_block=8, cmp_stride=4)
  layer = nsa.Attention(c.model, rngs=nnx.Rngs(fresh_seed()))
  q_BTHD = jax.random.normal(jax.random.key(fresh_seed()), (1, 12, 4, 16))
  ck_BCKD = jax.random.normal(jax.random.key(fresh_seed()), (1, 2, 2, 16))
  o_BTHD, idx_BTKn, _ = layer._compressed_and_choice(q_BTHD, ck_BCKD, ck_BCKD, jnp.arange(12)[None], 12,
                                                     kernel == 'pallas')
  assert np.all(np.asarray(o_BTHD[:, :7]) == 0)
  assert np.all(np.abs(np.asarray(o_BTHD[:, 7:])).sum(-1) > 0)
  assert np.all(np.asarray(idx_BTKn[:, :4]) <= 0) and np.all(np.asarray(idx_BTKn[:, :, :, 0]) >= 0)


def _model(kernel='xla', **nsa_overrides):
  return Transformer(_nsa_config(kernel, **nsa_overrides).model, rngs=nnx.Rngs(fresh_seed()))


def test_incremental_decoding_with_shared_kv_equals_parallel_forward():
  # The default (a K/V projection per branch) is checked with every variant in tests/test_variants.py.
  model = _model(shared_kv=True)
  assert_decoding_equals_parallel(model, T=23, P=6, B=2)


def test_nsa_model_trains_on_the_embedded_corpus(tmp_path):
  flags = [f'--config.model.nsa.{k}={v}' for k, v in SMALL_NSA.items()]
  run_train(tmp_path, '--config.model.attention=nsa', '--config.data.source=stdlib',
            '--config.train.steps=25', *flags)
  losses = train_losses(tmp_path)
  assert np.mean([losses[s] for s in range(21, 26)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.8
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model']['attention'] == 'nsa'


@pytest.mark.parametrize('l, d, sel', [(32, 16, 64), (4, 2, 4), (16, 2, 4), (32, 16, 16)])
def test_decodings_eq9_equals_the_kernels_reference(l, d, sel):
  """Decoding scores selection blocks from probabilities laid out blocks first, by rows of l'/d units;
  the same Eq. 9 as `block_selection.selection_scores`, for any block sizes."""
  layer = nsa.Attention(_nsa_config('xla', cmp_block=l, cmp_stride=d, sel_block=sel).model, rngs=nnx.Rngs(0))
  for S in (1000, 37):
    C, N = (S - l) // d + 1, -(-S // sel)
    p_BCTK = jax.random.uniform(jax.random.key(fresh_seed()), (2, C, 3, 2))
    want = selection_scores(p_BCTK.transpose(0, 3, 2, 1), N, cmp_block=l, cmp_stride=d, sel_block=sel)
    np.testing.assert_allclose(layer._selection_scores(p_BCTK, N), want.transpose(0, 2, 1, 3), atol=1e-5)
