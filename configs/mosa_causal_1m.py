"""Mixture of Sparse Attention at the dense ladder's rung '1m', the causal variant; see sparse_lm/ladder.py.

    python train.py --config=configs/mosa_causal_1m.py --workdir=runs/mosa_causal_1m
"""

from sparse_lm import ladder


def get_config():
  return ladder.mosa_config('1m', causal=True)
