"""Native Sparse Attention at the dense ladder's rung '1m': same parameter count, data and steps as
configs/dense_1m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_1m.py --workdir=runs/nsa_1m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('1m')
