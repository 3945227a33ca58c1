"""Dense ladder rung '3m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_3m.py --workdir=runs/dense_3m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('3m')
