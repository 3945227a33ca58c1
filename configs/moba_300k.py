"""Mixture of Block Attention (MoBA) at the dense ladder's rung '300k'.

Same parameters as configs/dense_300k.py (the gate has none),
the same data and steps; `sparse_lm.ladder.to_moba` gives its settings at this size.

    python train.py --config=configs/moba_300k.py --workdir=runs/moba_300k
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('300k', 'moba')
