"""Native Sparse Attention at the dense ladder's rung '10m': same parameter count, data and steps as
configs/dense_10m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_10m.py --workdir=runs/nsa_10m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('10m')
