"""Native Sparse Attention at the dense ladder's rung '300k': same parameter count, data and steps as
configs/dense_300k.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_300k.py --workdir=runs/nsa_300k
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('300k')
