"""The dense ladder: one recipe, sizes from ~1M to ~1B parameters, for scaling-law sweeps.

The recipe: pre-norm SwiGLU blocks with `mlp_dim` = 8/3 d_model rounded up to 64, grouped-query attention
with head_dim 32 (small rungs) or 64/128, the learning rate falling as 1/sqrt(width) from 3e-3 at
d_model=128, and 20 training tokens per parameter (Hoffmann et al. 2022). Rungs up to 10m run on a CPU
(byte tokens, seq_len 256, float32); the rest are meant for accelerators (seq_len 2048, bfloat16, the
Pallas kernels).
"""

import dataclasses
import functools

import ml_collections

from sparse_lm import flops, tokenizer
from sparse_lm.attention.mosa import isoflop_heads
from sparse_lm.config import base_config
from sparse_lm.errors import ConfigError

TOKENS_PER_PARAM = 20


@dataclasses.dataclass(frozen=True)
class Rung:
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  batch_size: int


RUNGS = {
    # Tiny rungs for isoFLOP studies on a CPU, head_dim 16 so widths come in fine steps.
    '100k': Rung(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, batch_size=16),
    '300k': Rung(num_layers=3, d_model=96, num_heads=6, num_kv_heads=2, batch_size=16),
    '1m': Rung(num_layers=5, d_model=128, num_heads=4, num_kv_heads=2, batch_size=16),
    '3m': Rung(num_layers=8, d_model=192, num_heads=6, num_kv_heads=2, batch_size=16),
    '10m': Rung(num_layers=6, d_model=384, num_heads=6, num_kv_heads=2, batch_size=32),
    '30m': Rung(num_layers=10, d_model=512, num_heads=8, num_kv_heads=2, batch_size=128),
    '100m': Rung(num_layers=16, d_model=768, num_heads=12, num_kv_heads=4, batch_size=128),
    '300m': Rung(num_layers=26, d_model=1024, num_heads=16, num_kv_heads=4, batch_size=256),
    '1b': Rung(num_layers=22, d_model=2048, num_heads=16, num_kv_heads=4, batch_size=256),
}
CPU_RUNGS = ('100k', '300k', '1m', '3m', '10m')

# Plans for the accelerator rungs whose data-parallel train step does not fit 8 devices, found by
# `python -m sparse_lm.compile --config=configs/<variant>_<rung>.py --target=h100x8 --fit` and confirmed
# by a full compile on h100x8 and a reduced-depth one on v5p:2x2x2 (BENCHMARKS.md, "Plans that fit";
# results/compile/plans/):
# (variant, rung) -> mesh axes, what the backward recomputes ('none', 'attention', 'block') and
# gradient accumulation. The rest ship 8-way data parallel, no recomputation, no accumulation.
PLANS: dict[tuple[str, str], dict] = {
    # h100x8 at full depth (2026-12-07): peak GiB per device of 71.7 allowed.
    ('dense', '1b'): {'grad_accum': 2},  # 57.3
    ('nsa', '1b'): {'grad_accum': 4},  # 44.9
    ('moba', '1b'): {'grad_accum': 2},  # 57.5
    ('dsa', '1b'): {'grad_accum': 4},  # 61.3
    # Re-searched once the experts' gradients were reduced once a step instead of once a microbatch
    # (fsdp 4 x data 2 with 4 microbatches before: 56.4 GiB, 131.3 GB sent; now 12.0 GB).
    ('moe', '1b'): {'grad_accum': 16},  # 62.5
    ('moe', '300m'): {'grad_accum': 2},  # 51.7
    ('dsa', '300m'): {'grad_accum': 4},  # 44.1
    # Fits h100x8 without (61.5) but not v5p:2x2x2 (102.7 of 85.5; TPU's buffers are larger here);
    # with it 39.2 on h100x8 and 56.0 of 85.5 on v5p:2x2x2 (extrapolated).
    ('nsa', '300m'): {'grad_accum': 2},
}
# Overrides ('mesh.fsdp': 8, ...) for v5p:2x2x2 where its plan differs from h100x8's, given as
# `--config.KEY=VALUE` in the config file's docstring.
V5P_OVERRIDES: dict[tuple[str, str], dict[str, object]] = {
    ('moe', '1b'): {'train.grad_accum_steps': 32},  # 75.4 GiB of 85.5; 16 microbatches: 83.0 (extrapolated)
}


def apply_shape(c: ml_collections.ConfigDict, *, num_layers: int, d_model: int, num_heads: int,
                num_kv_heads: int) -> None:
  """Sets a model shape and what the recipe derives from it: head_dim, SwiGLU width and learning rate."""
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = num_layers, d_model, num_heads, num_kv_heads
  m.head_dim = d_model // num_heads
  m.mlp_dim = -(-8 * d_model // 3 // 64) * 64
  c.train.learning_rate = 3e-3 * (128 / d_model) ** 0.5


def dense_config(name: str) -> ml_collections.ConfigDict:
  rung = RUNGS[name]
  c = base_config()
  m = c.model
  apply_shape(c, num_layers=rung.num_layers, d_model=rung.d_model, num_heads=rung.num_heads,
              num_kv_heads=rung.num_kv_heads)
  c.train.batch_size = rung.batch_size
  if name not in CPU_RUNGS:  # accelerator rungs run the Pallas kernels (interpreted on a CPU: slow)
    m.dtype = 'bfloat16'
    m.kernel = 'pallas'
    c.data.seq_len = 2048
    c.train.warmup_steps = 1000
    c.train.eval_every = c.checkpoint.every_steps = 1000
    c.train.log_every = 50
  params = flops.param_counts(_sized(c))['total_params']
  tokens_per_step = c.train.batch_size * c.data.seq_len
  c.train.steps = max(c.train.warmup_steps + 1, round(TOKENS_PER_PARAM * params / tokens_per_step))
  ship_plan(c, 'dense', name)
  return c


def ship_plan(c: ml_collections.ConfigDict, variant: str, rung: str) -> None:
  """The rung's plan from `PLANS` (or 8-way data parallel), replacing whatever plan `c` had."""
  plan = PLANS.get((variant, rung), {})
  c.mesh.update({'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1, 'context': 1, **plan.get('mesh', {})})
  recompute = plan.get('recompute', 'none')
  c.model.remat, c.model.remat_attention = recompute == 'block', recompute == 'attention'
  c.train.grad_accum_steps = plan.get('grad_accum', 1)


def _sized(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  sized = ml_collections.ConfigDict(config.model.to_dict())
  sized.vocab_size = tokenizer.vocab_size_for(config)
  return sized


def nsa_config(name: str) -> ml_collections.ConfigDict:
  """The rung with NSA at the same parameter count (`to_nsa`), data and steps."""
  c = dense_config(name)
  to_nsa(c, small=name in CPU_RUNGS)
  ship_plan(c, 'nsa', name)
  return c


def moe_config(name: str) -> ml_collections.ConfigDict:
  """The rung with fine-grained MoE MLPs at the same active size (`to_moe`), data and steps."""
  c = dense_config(name)
  to_moe(c, small=name in CPU_RUNGS)
  ship_plan(c, 'moe', name)
  return c


def mosa_config(name: str, *, causal: bool = False, sparsity: int | None = None) -> ml_collections.ConfigDict:
  """The rung with MoSA at equal attention FLOPs at `sparsity` rho (`to_mosa`): "isoFLOP with dense size
  `name` at sparsity rho"; `causal`: mosa_causal."""
  c = dense_config(name)
  to_mosa(c, small=name in CPU_RUNGS, causal=causal, sparsity=sparsity)
  ship_plan(c, c.model.attention, name)
  return c


def variant_config(name: str, variant: str) -> ml_collections.ConfigDict:
  """The rung turned into `variant` by its `VARIANTS` recipe (MoBA, DSA, ...), same data and steps."""
  c = dense_config(name)
  VARIANTS[variant](c, small=name in CPU_RUNGS)
  ship_plan(c, variant, name)
  return c


def routing_config(name: str, *, causal: bool = False) -> ml_collections.ConfigDict:
  """The rung with half its heads routing heads (`to_routing`); `causal`: routing_causal."""
  c = dense_config(name)
  to_routing(c, small=name in CPU_RUNGS, causal=causal)
  ship_plan(c, c.model.attention, name)
  return c


# ----------------------------------------------------------------------------- variants
# Each turns a dense config of any shape (a rung, or a sweep's interpolated size) into its variant in
# place, keeping data, optimiser and steps. `small`: CPU scale (sequences of 256), where the papers'
# block and window sizes would cover the whole sequence, so they are scaled down.

def to_nsa(c: ml_collections.ConfigDict, *, small: bool) -> None:
  """NSA at the dense config's parameter count.

  NSA's extra key/value projections, compression MLPs and gates are paid for by a narrower MLP, so
  dense and NSA compare at equal parameters. Accelerator sizes use the paper's l=32, d=16, l'=64,
  n=16, w=512 (Sec. 4.1); CPU sizes (sequences of 256) scale the blocks down so selection still
  leaves keys out.
  """
  dense_params = flops.param_counts(_sized(c))['total_params']
  c.model.attention = 'nsa'
  if small:
    c.model.nsa.update(cmp_block=16, cmp_stride=8, sel_block=16, num_selected=4, window=32)
  _pay_with_mlp(c, dense_params, 'NSA', 'its branches')


def _pay_with_mlp(c: ml_collections.ConfigDict, dense_params: int, variant: str, what: str) -> None:
  """Narrows the MLP by the parameters a variant added to the dense config (whole multiples of 8)."""
  added = flops.param_counts(_sized(c))['total_params'] - dense_params
  per_unit = 3 * c.model.num_layers * c.model.d_model  # parameters per unit of SwiGLU width
  mlp_dim = c.model.mlp_dim - round(added / per_unit / 8) * 8
  if mlp_dim < 8:
    raise ConfigError(f'{variant} at num_layers={c.model.num_layers}, d_model={c.model.d_model}: {what} '
                      f'add {added:,} parameters, more than the dense MLP holds; equal parameters need a '
                      'larger model')
  c.model.mlp_dim = mlp_dim


def _long_context(c: ml_collections.ConfigDict, seq_len: int) -> None:
  """Sequences of `seq_len` at the same tokens per step (fewer rows), so data and steps stay the rung's."""
  rows = c.train.batch_size * c.data.seq_len // seq_len
  if rows < 1:
    raise ConfigError(f'data.seq_len={seq_len} holds more than a step of train.batch_size='
                      f'{c.train.batch_size} x {c.data.seq_len} tokens')
  c.data.seq_len, c.train.batch_size = seq_len, rows


def to_moba(c: ml_collections.ConfigDict, *, small: bool) -> None:
  """MoBA at the dense config's parameters (the gate has none). Accelerator sizes use the paper's
  scaling-law setting (Lu et al. 2025: 8K tokens, blocks of 512, top-3, no dense layers), at the
  rung's tokens per step; CPU sizes (256 tokens) blocks of 32, top-3
  (of 8 blocks: the paper's 3 of 16 would leave blocks of 16)."""
  c.model.attention = 'moba'
  if small:
    c.model.moba.update(block_size=32, top_k=3)
  else:
    _long_context(c, 8192)
    c.model.moba.update(block_size=512, top_k=3)


def to_dsa(c: ml_collections.ConfigDict, *, small: bool) -> None:
  """DSA at the dense config's parameter count, the indexer paid for by a narrower MLP. Accelerator
  sizes: the paper's top-k of 2,048 tokens (DeepSeek-AI 2025, Sec. 2.1) at 8K tokens (the rung's tokens
  per step), an indexer of 8 heads of 64 (the paper's 64 x 128 is sized for a width of 7,168), token
  granularity (on TPU set `model.dsa.block_size=64`: no token-gather body there); CPU sizes: 64 of
  256 tokens, 4 index heads of 16. Sparse from step 0 (no dense warm-up) so the comparison is of
  training sparse from scratch."""
  dense_params = flops.param_counts(_sized(c))['total_params']
  c.model.attention = 'dsa'
  if small:
    c.model.dsa.update(top_k=64, index_heads=4, index_head_dim=16, block_size=1)
  else:
    _long_context(c, 8192)
    c.model.dsa.update(top_k=2048, index_heads=8, index_head_dim=64, block_size=1)
  _pay_with_mlp(c, dense_params, 'DSA', 'its indexer')


def to_moe(c: ml_collections.ConfigDict, *, small: bool) -> None:
  """Fine-grained MoE MLPs (DeepSeekMoE, Dai et al. 2024) at the dense config's *active* size.

  Each MLP becomes 16 routed experts and 1 shared expert, each a quarter of the dense `mlp_dim`, with
  the top 3 routed experts per token: a token runs through 4 quarter-width experts, the dense width,
  so active parameters equal the dense config's up to the router (d_model x 16 per layer, about 1%)
  while total MLP parameters grow 4.25-fold. Softmax routing with the Switch balance loss and z-loss,
  dropless execution. The same at every scale (`small` is unused).
  """
  del small
  c.model.mlp = 'moe'
  c.model.moe.update(num_experts=16, top_k=3, num_shared_experts=1, granularity=0.25, score='softmax',
                     normalize_top_k=True, execution='dropless', load_balance_weight=0.01,
                     z_loss_weight=1e-3)


def to_mosa(c: ml_collections.ConfigDict, *, small: bool, causal: bool = False,
            sparsity: int | None = None) -> None:
  """MoSA at equal attention FLOPs (Piękos et al. 2025's isoFLOP rule): it keeps `num_kv_heads` dense
  heads, each on its own K/V head, and spends the rest of the dense layer's FLOPs (its grouped K/V
  counted once per kv head, its attention causally, as `sparse_lm.flops` counts) on MoSA heads at
  `sparsity` rho: by default 8 (CPU sizes, sequences of 256) or 64 (the paper's, accelerator sizes), so
  the variant's FLOPs per token do not exceed the dense model's. `causal`: mosa_causal, whose heads
  each run `capacity_factor` k slots, so fewer of them fit."""
  m = c.model
  rho = sparsity or (8 if small else 64)
  dense_kv = m.num_kv_heads
  kept = _kept_heads(m, m.num_kv_heads)
  heads = isoflop_heads(m.d_model, m.head_dim, m.num_heads, c.data.seq_len, rho, kept,
                        dense_kv_heads=dense_kv, kept_kv_heads=m.num_kv_heads,
                        capacity_factor=m.mosa.capacity_factor if causal else None, causal_mask=True)
  if heads < 1:
    raise ValueError(f'MoSA at data.seq_len={c.data.seq_len}, sparsity {rho}: one head costs more than '
                     f'the {m.num_heads - kept} dense heads it would replace; use a lower sparsity')
  m.attention = 'mosa_causal' if causal else 'mosa'
  m.mosa.update(num_heads=heads, sparsity=rho)
  m.num_heads = kept


def to_routing(c: ml_collections.ConfigDict, *, small: bool, causal: bool = False) -> None:
  """Half the heads local (window 32 on CPU sizes, 256 on accelerators) and half routing heads over
  about sqrt(T) clusters (Roy et al. 2021); same parameters up to the routing heads' shared Q/K.
  `causal`: routing_causal."""
  m = c.model
  local = _kept_heads(m, max(m.num_kv_heads, m.num_heads // 2 // m.num_kv_heads * m.num_kv_heads))
  m.attention = 'routing_causal' if causal else 'routing'
  m.routing.update(num_heads=m.num_heads - local, num_clusters=round(c.data.seq_len ** 0.5),
                   window=32 if small else 256)
  m.num_heads = local


def _kept_heads(m: ml_collections.ConfigDict, wanted: int) -> int:
  """`wanted` dense heads kept beside the sparse ones if that leaves some heads to convert; on tiny
  shapes (heads == kv heads) one kv head and half the heads instead."""
  if wanted < m.num_heads:
    return wanted
  if m.num_heads < 2:
    raise ValueError(f'model.num_heads={m.num_heads}: a sparse variant needs at least 2 heads to split')
  m.num_kv_heads = 1
  return m.num_heads // 2


# name -> in-place transform of a dense config; what `sparse_lm.sweep` sizes and runs.
VARIANTS = {
    'dense': lambda c, *, small: None,
    'nsa': to_nsa,
    'mosa': functools.partial(to_mosa, causal=False),
    'mosa_causal': functools.partial(to_mosa, causal=True),
    'routing': functools.partial(to_routing, causal=False),
    'routing_causal': functools.partial(to_routing, causal=True),
    'moe': to_moe,
    'moba': to_moba,
    'dsa': to_dsa,
}
