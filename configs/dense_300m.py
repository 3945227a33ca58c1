"""Dense ladder rung '300m' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_300m.py --workdir=runs/dense_300m
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('300m')
