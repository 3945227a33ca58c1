"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '3m'.

Same parameter count as configs/dense_3m.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_3m.py --workdir=runs/dsa_3m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('3m', 'dsa')
