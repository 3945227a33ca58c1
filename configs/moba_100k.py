"""Mixture of Block Attention (MoBA) at the dense ladder's rung '100k'.

Same parameters as configs/dense_100k.py (the gate has none),
the same data and steps; `sparse_lm.ladder.to_moba` gives its settings at this size.

    python train.py --config=configs/moba_100k.py --workdir=runs/moba_100k
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('100k', 'moba')
