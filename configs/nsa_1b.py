"""Native Sparse Attention at the dense ladder's rung '1b': same parameter count, data and steps as
configs/dense_1b.py (see sparse_lm/ladder.py).

    python train.py --config=configs/nsa_1b.py --workdir=runs/nsa_1b
"""

from sparse_lm import ladder


def get_config():
  return ladder.nsa_config('1b')
