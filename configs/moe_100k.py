"""MoE ladder rung '100k': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_100k.py --workdir=runs/moe_100k
    python -m sparse_lm.flops --config=configs/moe_100k.py   # total and active parameters
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('100k')
