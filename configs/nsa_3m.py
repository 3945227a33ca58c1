"""Native Sparse Attention at the dense ladder's rung '3m': same parameter count, data and steps as
configs/dense_3m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_3m.py --workdir=runs/nsa_3m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('3m')
