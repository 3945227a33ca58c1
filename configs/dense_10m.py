"""Dense ladder rung '10m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_10m.py --workdir=runs/dense_10m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('10m')
