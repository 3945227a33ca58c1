"""The shared top-n block choice against a per-query loop of its rule, for NSA's forced blocks and for
other settings of them (MoBA's own block only, none)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_choice import select_blocks
from tests.conftest import fresh_seed


def _per_query(score_TN, t: int, *, n: int, block_size: int, force_first: bool, force_local: int):
  """The rule for one query, from its definition: forced blocks by index, then the other valid blocks
  by descending score and ascending index, -1 for slots with no valid block left."""
  valid = [j for j in range(score_TN.shape[-1]) if j * block_size <= t]
  own = t // block_size
  forced = sorted(j for j in valid if (force_first and j == 0) or own - force_local < j <= own)
  rest = sorted((j for j in valid if j not in forced), key=lambda j: (-score_TN[t, j], j))
  chosen = (forced + rest)[:n]
  return chosen + [-1] * (n - len(chosen))


@pytest.mark.parametrize('force_first,force_local', [(True, 2), (False, 1), (False, 0), (True, 0)])
def test_choice_follows_the_rule_with_any_forced_blocks(force_first, force_local):
  rng = np.random.default_rng(fresh_seed())
  B, T, K, block_size, n = 2, 29, 2, 4, 3
  N = -(-T // block_size)
  # Distinct scores, so the order is defined without ties.
  score_BTKN = rng.permutation(B * T * K * N).reshape(B, T, K, N).astype(np.float32)
  pos_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  got = np.asarray(select_blocks(jnp.asarray(score_BTKN), pos_BT, num_selected=n, block_size=block_size,
                                 force_first=force_first, force_local=force_local))
  assert got.shape == (B, T, K, n) and got.dtype == np.int32
  for b in range(B):
    for k in range(K):
      for t in range(T):
        want = _per_query(score_BTKN[b, :, k], t, n=n, block_size=block_size, force_first=force_first,
                          force_local=force_local)
        assert list(got[b, t, k]) == want, (b, t, k)
