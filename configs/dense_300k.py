"""Dense ladder rung '300k' (see sparse_lm/ladder.py for the shared recipe).

    python train.py --config=configs/dense_300k.py --workdir=runs/dense_300k
"""

from sparse_lm import ladder


def get_config():
  return ladder.dense_config('300k')
