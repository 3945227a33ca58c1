"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '30m'.

Same parameter count as configs/dense_30m.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_30m.py --workdir=runs/dsa_30m
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('30m', 'dsa')
