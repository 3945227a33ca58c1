"""Mixture of Block Attention (MoBA) at the dense ladder's rung '300m'.

Same parameters as configs/dense_300m.py (the gate has none),
the same data and steps; `sparse_lm.ladder.to_moba` gives its settings at this size.

    python train.py --config=configs/moba_300m.py --workdir=runs/moba_300m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('300m', 'moba')
