"""Mixture of Block Attention (MoBA) at the dense ladder's rung '100m'.

Same parameters as configs/dense_100m.py (the gate has none),
the same data and steps; `sparse_lm.ladder.to_moba` gives its settings at this size.

    python train.py --config=configs/moba_100m.py --workdir=runs/moba_100m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('100m', 'moba')
