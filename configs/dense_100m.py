"""Dense ladder rung '100m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_100m.py --workdir=runs/dense_100m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('100m')
