"""Native Sparse Attention at the dense ladder's rung '30m': same parameter count, data and steps as
configs/dense_30m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_30m.py --workdir=runs/nsa_30m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('30m')
