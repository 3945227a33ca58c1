"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '300m'.

Same parameter count as configs/dense_300m.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_300m.py --workdir=runs/dsa_300m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('300m', 'dsa')
