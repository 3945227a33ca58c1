"""MoE ladder rung '1b': the dense rung's active size with fine-grained experts (see
sparse_lm/ladder.py, moe_config).

    python train.py --config=configs/moe_1b.py --workdir=runs/moe_1b
    python -m sparse_lm.flops --config=configs/moe_1b.py   # total and active parameters

Plan for 8 devices (`python -m sparse_lm.compile --config=configs/moe_1b.py --target=h100x8 --fit`):
mesh fsdp 4 (data 2 on 8 devices), gradient accumulation 4 (56.4 GiB on h100x8);
it fits a TPU v5p 8-chip slice as shipped.
"""

from sparse_lm import ladder


def get_config():
  return ladder.moe_config('1b')
