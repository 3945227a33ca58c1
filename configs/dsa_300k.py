"""DeepSeek Sparse Attention (DSA) at the dense ladder's rung '300k'.

Same parameter count as configs/dense_300k.py (a narrower MLP pays for the indexer),
the same data and steps; `sparse_lm.ladder.to_dsa` gives its settings at this size.

    python train.py --config=configs/dsa_300k.py --workdir=runs/dsa_300k
"""

from sparse_lm import ladder


def get_config():
  return ladder.variant_config('300k', 'dsa')
