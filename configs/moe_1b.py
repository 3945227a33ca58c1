"""MoE ladder rung '1b': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_1b.py --workdir=runs/moe_1b
    python -m sparse_lm.flops --config=configs/moe_1b.py   # total and active parameters
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('1b')
