"""Native Sparse Attention at the dense ladder's rung '300m': same parameter count, data and steps as
configs/dense_300m.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_300m.py --workdir=runs/nsa_300m
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('300m')
