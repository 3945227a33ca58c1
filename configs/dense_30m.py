"""Dense ladder rung '30m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_30m.py --workdir=runs/dense_30m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('30m')
