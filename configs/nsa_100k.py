"""Native Sparse Attention at the dense ladder's rung '100k': same parameter count, data and steps as
configs/dense_100k.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_100k.py --workdir=runs/nsa_100k
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('100k')
