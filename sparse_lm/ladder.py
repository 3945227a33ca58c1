"""The dense ladder: one recipe, sizes from ~1M to ~1B parameters, for scaling-law sweeps.

The recipe: pre-norm SwiGLU blocks with `mlp_dim` = 8/3 d_model rounded up to 64, grouped-query attention
with head_dim 32 (small rungs) or 64/128, the learning rate falling as 1/sqrt(width) from 3e-3 at
d_model=128, and 20 training tokens per parameter (Hoffmann et al. 2022). Rungs up to 10m run on a CPU
(byte tokens, seq_len 256, float32); the rest are meant for accelerators (seq_len 2048, bfloat16).
"""

import dataclasses

import ml_collections

from sparse_lm.config import base_config

TOKENS_PER_PARAM = 20


@dataclasses.dataclass(frozen=True)
class Rung:
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  batch_size: int


RUNGS = {
    '1m': Rung(num_layers=5, d_model=128, num_heads=4, num_kv_heads=2, batch_size=16),
    '3m': Rung(num_layers=8, d_model=192, num_heads=6, num_kv_heads=2, batch_size=16),
    '10m': Rung(num_layers=6, d_model=384, num_heads=6, num_kv_heads=2, batch_size=32),
    '30m': Rung(num_layers=10, d_model=512, num_heads=8, num_kv_heads=2, batch_size=128),
    '100m': Rung(num_layers=16, d_model=768, num_heads=12, num_kv_heads=4, batch_size=128),
    '300m': Rung(num_layers=26, d_model=1024, num_heads=16, num_kv_heads=4, batch_size=256),
    '1b': Rung(num_layers=22, d_model=2048, num_heads=16, num_kv_heads=4, batch_size=256),
}
CPU_RUNGS = ('1m', '3m', '10m')


def dense_config(name: str) -> ml_collections.ConfigDict:
  from sparse_lm import flops, tokenizer  # deferred: the model imports config, which configs load first

  rung = RUNGS[name]
  c = base_config()
  m = c.model
  m.num_layers, m.d_model = rung.num_layers, rung.d_model
  m.num_heads, m.num_kv_heads = rung.num_heads, rung.num_kv_heads
  m.head_dim = rung.d_model // rung.num_heads
  m.mlp_dim = -(-8 * rung.d_model // 3 // 64) * 64
  c.train.batch_size = rung.batch_size
  c.train.learning_rate = 3e-3 * (128 / rung.d_model) ** 0.5
  if name not in CPU_RUNGS:
    m.dtype = 'bfloat16'
    c.data.seq_len = 2048
    c.train.warmup_steps = 1000
    c.train.eval_every = c.checkpoint.every_steps = 1000
    c.train.log_every = 50
  sized = ml_collections.ConfigDict(m.to_dict())
  sized.vocab_size = tokenizer.vocab_size_for(c)
  params = flops.param_counts(sized)['total_params']
  tokens_per_step = c.train.batch_size * c.data.seq_len
  c.train.steps = max(c.train.warmup_steps + 1, round(TOKENS_PER_PARAM * params / tokens_per_step))
  return c
