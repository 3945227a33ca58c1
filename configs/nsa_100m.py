"""Native Sparse Attention at the dense ladder's rung '100m': same parameter count, data and steps as
configs/dense_100m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_100m.py --workdir=runs/nsa_100m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('100m')
