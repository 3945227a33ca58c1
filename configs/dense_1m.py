"""Dense ladder rung '1m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_1m.py --workdir=runs/dense_1m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('1m')
