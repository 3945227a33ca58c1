"""Train-step time of a dropless MoE, a capacity-limited MoE and the dense model of equal active size.

    python benchmarks/moe_step.py [--steps=5] [--kernel=xla] [--batch_size=16] [--seq_len=256]

A CPU-sized model (4 layers, d_model 128, dense mlp_dim 384) on one device. The MoE models have 8
experts of half the dense width and route each token to 2 of them, so a token's MLP work equals the
dense model's; only routing, sorting and dispatch differ. The full jitted train step (forward,
backward, AdamW) runs on random tokens: one compiling step, one warm-up step, then the median of
`--steps` timed steps.
"""

import statistics
import time

import jax
from absl import app, flags

from sparse_lm import flops, optim, trainer
from sparse_lm.config import base_config

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps after warm-up.')
_KERNEL = flags.DEFINE_string('kernel', 'xla', 'model.kernel: xla or pallas.')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')

VARIANTS = {
    'dense': dict(mlp='dense'),
    'moe dropless': dict(mlp='moe', execution='dropless'),
    'moe capacity 1.25': dict(mlp='moe', execution='capacity', capacity_factor=1.25),
}


def make_config(mlp: str, **moe):
  c = base_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                 vocab_size=256, mlp=mlp, kernel=_KERNEL.value)
  c.model.moe.update(num_experts=8, top_k=2, granularity=0.5, **moe)
  c.data.seq_len, c.train.batch_size = _SEQ_LEN.value, _BATCH.value
  return c


def step_seconds(config) -> float:
  tx, schedule = optim.make_optimizer(config.train)
  graphdef, _, _ = trainer.split_model(config.model)
  state = jax.jit(trainer.state_init_fn(config, tx))(jax.random.key(0))
  step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, 1), donate_argnums=0)
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ_LEN.value + 1), 0, 256)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
  times = []
  for i in range(_STEPS.value + 2):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= 2:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv) -> None:
  del argv
  tokens = _BATCH.value * _SEQ_LEN.value
  print(f'{jax.devices()[0].device_kind}, {tokens} tokens per step, kernel={_KERNEL.value}')
  print(f'| {"model":<18} | {"total params":>12} | {"active params":>13} | {"ms / step":>9} | '
        f'{"tokens / s":>10} |')
  print(f'|{"-" * 20}|{"-" * 13}:|{"-" * 14}:|{"-" * 10}:|{"-" * 11}:|')
  for name, settings in VARIANTS.items():
    config = make_config(**settings)
    counts = flops.param_counts(config.model)
    seconds = step_seconds(config)
    print(f'| {name:<18} | {counts["total_params"]:>12,} | {counts["active_params"]:>13,} | '
          f'{seconds * 1e3:>9.1f} | {tokens / seconds:>10,.0f} |')


if __name__ == '__main__':
  app.run(main)
