"""MoE ladder rung '300k': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_300k.py --workdir=runs/moe_300k
    python -m sparse_lm.flops --config=configs/moe_300k.py   # total and active parameters
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('300k')
