"""Routing attention at the dense ladder's rung '1m', the paper's version, NOT causal (its token
choice sees the whole sequence); see sparse_lm/ladder.py.

    python train.py --config=configs/routing_1m.py --workdir=runs/routing_1m
"""

from sparse_lm import ladder


def get_config():
  return ladder.routing_config('1m')
