"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '10m'.

Same parameter count as configs/dense_10m.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_10m.py --workdir=runs/dsa_10m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('10m', 'dsa')
