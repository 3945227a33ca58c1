"""Finding a plan that fits a target: mesh, recomputation and gradient accumulation, searched by compiling.

    python -m sparse_lm.compile --config=configs/nsa_1b.py --target=h100x8 --fit [--fit_compiles=24]

A plan is the mesh (`data`, `fsdp`, `tensor`, `expert`, and `context` where every layer's attention
runs with its sequences split, sparse_lm/context.py), what the backward recomputes (`none`;
`attention`: each attention sublayer, `model.remat_attention`; `block`: each whole block, `model.remat`)
and `train.grad_accum_steps`, at the config's global batch. The search:

1. Enumerates the plans the config allows: heads split evenly over `tensor`, experts over `expert` (MoE
   only), every microbatch's rows over `data * fsdp` (`checks.check_train`).
2. Orders them by an estimate made before compiling (`prior_seconds`: FLOPs with recomputation over the
   target's peak, plus the bytes each device sends in the collectives the mesh implies over its link),
   and compiles next the cheapest that a memory model (`MemoryModel`, refitted after every compile)
   expects to fit; while it expects none, the one it expects to need least.
3. Compiles each plan at two reduced depths (one and two repeats of the layer pattern, MoE's dense
   blocks kept) and extrapolates the peak memory per device linearly to the full depth, with the
   collectives' bytes read from the compiled program (`aot.collectives`, loops counted by their trip
   counts). A plan needing no less memory than one that did not fit (same mesh, no more recomputation
   or accumulation), or costing no less than one that fits (same mesh, no less of either), is skipped
   without compiling.
4. Ranks the plans that fit by the estimated step time from what the compiler reports (fewer
   microbatches first where it ties, as smaller matmuls run less efficiently):
   `flops / peak + collective bytes / link bandwidth` (no overlap assumed: an upper bound, used only to
   order plans; recomputation's FLOPs come from `flops.flops_per_token`, as XLA's cost model counts no
   FLOPs inside Pallas kernels), then compiles the best at full depth to confirm that it fits.

Extrapolation is not exact: on the 1b rung on h100x8 it came within -5.5% to +4.4% of the full
compile (DSA 57.9 against 61.3 GiB; MoBA 60.0 against 57.5), as XLA's buffer assignment and its own
rematerialisation near the limit are not linear in depth. So a plan near the limit can be misjudged
while searching, and the chosen plan is always compiled whole before it is printed. Each tried plan's
extrapolated peak is printed.
"""

import dataclasses
import itertools
import math

import ml_collections

from sparse_lm import aot, attention, checks, flops, sharding
from sparse_lm.errors import ConfigError

RECOMPUTE = ('none', 'attention', 'block')
ACCUM = (1, 2, 4, 8, 16, 32)

# Peak dense bfloat16 FLOP/s and the bytes per second a device sends over its fastest link (half the
# bidirectional figure). H100 SXM: 989 TFLOP/s, NVLink 900 GB/s (NVIDIA H100 datasheet); A100 SXM:
# 312 TFLOP/s, NVLink 600 GB/s (A100 datasheet); TPU v5p: 459 TFLOP/s, ICI 1,200 GB/s; v5e: 197 TFLOP/s,
# ICI 1,600 Gbps; v6e: 918 TFLOP/s, ICI 3,584 Gbps (Cloud TPU system architecture pages).
SPEEDS = {'h100': (989e12, 450e9), 'a100': (312e12, 300e9), 'v5p': (459e12, 600e9),
          'v5e': (197e12, 100e9), 'v6e': (918e12, 224e9), 'v4': (275e12, 300e9)}


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh: tuple[int, ...]  # sizes in sharding.MESH_AXES order (data, fsdp, tensor, expert, context)
  recompute: str
  grad_accum: int

  def mesh_dict(self) -> dict[str, int]:
    return dict(zip(sharding.MESH_AXES, self.mesh, strict=True))

  def overrides(self) -> list[str]:
    out = [f'--config.mesh.{axis}={size}' for axis, size in self.mesh_dict().items()]
    out += [f'--config.model.remat={self.recompute == "block"}',
            f'--config.model.remat_attention={self.recompute == "attention"}',
            f'--config.train.grad_accum_steps={self.grad_accum}']
    return out

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    c.mesh.update(self.mesh_dict())
    c.model.remat = self.recompute == 'block'
    c.model.remat_attention = self.recompute == 'attention'
    c.train.grad_accum_steps = self.grad_accum
    return c

  def saves_no_more_than(self, other: 'Plan') -> bool:
    """Same mesh, no more recomputation or accumulation: needs at least `other`'s memory."""
    return (self.mesh == other.mesh and RECOMPUTE.index(self.recompute) <= RECOMPUTE.index(other.recompute)
            and self.grad_accum <= other.grad_accum)

  def describe(self) -> str:
    mesh = ','.join(f'{a}={s}' for a, s in self.mesh_dict().items() if s > 1) or 'one device'
    return f'{mesh} recompute={self.recompute} grad_accum={self.grad_accum}'


def shipped_plan(config: ml_collections.ConfigDict, num_devices: int) -> Plan:
  recompute = 'block' if config.model.remat else 'attention' if config.model.remat_attention else 'none'
  return Plan(sharding.mesh_shape(config.mesh, num_devices), recompute, config.train.grad_accum_steps)


def candidate_plans(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int = 1) -> list[Plan]:
  """Every plan the config allows on `num_devices` devices."""
  m = config.model
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  heads = math.gcd(m.num_heads, m.num_kv_heads)
  experts = m.moe.num_experts if m.mlp == 'moe' else 1
  splits = divisors if attention.every_layer(m, 'context_parallel') else [1]
  plans = []
  for tensor, expert, fsdp, ctx in itertools.product(divisors, divisors, divisors, splits):
    if heads % tensor or experts % expert or num_devices % (tensor * expert * fsdp * ctx):
      continue
    data = num_devices // (tensor * expert * fsdp * ctx)
    for recompute, accum in itertools.product(RECOMPUTE, ACCUM):
      plan = Plan((data, fsdp, tensor, expert, ctx), recompute, accum)
      try:
        checks.check_train(plan.apply(config), num_devices, num_hosts)
      except ConfigError:
        continue
      plans.append(plan)
  return plans


def speeds(target: aot.Target) -> tuple[float, float]:
  kind = target.name.split(':')[0].split('x')[0]
  return SPEEDS.get(kind, SPEEDS['h100'])


def step_flops(config: ml_collections.ConfigDict, recompute: str) -> float:
  """Training FLOPs of one step, all devices, with what the plan recomputes: the attention sublayers'
  forward (their products and projections) or every block's forward."""
  per_token = flops.flops_per_token(config)['flops_per_token']
  attn_params = sum(size for path, size in flops.param_sizes(config.model).items()
                    if len(path) > 2 and path[0] == 'blocks' and path[2] == 'attn')
  extra = {'none': 0.0, 'attention': per_token['attention'] / 3 + 2 * attn_params,
           'block': per_token['total'] / 3}[recompute]
  return (per_token['total'] + extra) * config.train.batch_size * config.data.seq_len


def prior_bytes(config: ml_collections.ConfigDict, plan: Plan, params: int) -> float:
  """Bytes a device sends per step in the collectives the plan's mesh implies (ring algorithms): fsdp
  gathers the weights for the forward and the backward of every microbatch and reduce-scatters the
  gradients; data all-reduces the gradients once; tensor all-reduces two activations per block forward
  and two backward; expert exchanges each MoE block's tokens twice each way; context passes each
  device's keys and values around the ring, once forward and twice backward (the keys, values and their
  gradients)."""
  m, d = config.model, plan.mesh_dict()
  act = 2 if m.dtype == 'bfloat16' else 4
  share = lambda n: (n - 1) / n  # noqa: E731
  rows = config.train.batch_size // (d['data'] * d['fsdp'])  # per device, all microbatches
  activation = rows * config.data.seq_len * m.d_model * act
  total = plan.grad_accum * 2 * params * act * share(d['fsdp']) / d['tensor']
  total += 4 * params * share(d['fsdp']) / d['tensor']
  total += 2 * 4 * params / (d['fsdp'] * d['tensor']) * share(d['data'])
  total += m.num_layers * 4 * 2 * activation * share(d['tensor'])
  if m.mlp == 'moe':
    total += m.num_layers / m.moe.every * 4 * activation * m.moe.top_k * share(d['expert'])
  kv_rows = activation / m.d_model * 2 * m.num_kv_heads * m.head_dim / d['context']  # K and V, one pass
  total += m.num_layers * 3 * kv_rows * (d['context'] - 1)
  return total


# Share of a block's activations the backward keeps, by what it recomputes: a first guess, replaced by
# what the compiles show (`MemoryModel`).
KEPT = {'none': 1.0, 'attention': 0.6, 'block': 0.15}


class MemoryModel:
  """Peak bytes per device of a plan, before compiling it: the training state (float32 parameters,
  gradients and two Adam moments, 16 bytes a parameter, split over fsdp, tensor and expert) plus
  activations proportional to a device's tokens per microbatch times the layers' width, over `tensor`,
  at a rate per recomputation level fitted to the plans compiled so far (the median of what each
  showed); levels not yet compiled scale a compiled one's rate by `KEPT`. Only orders the search."""

  def __init__(self, config: ml_collections.ConfigDict, params: int):
    self.config, self.params = config, params
    self.rates: dict[str, list[float]] = {level: [] for level in RECOMPUTE}

  def _terms(self, plan: Plan) -> tuple[float, float]:
    m, d = self.config.model, plan.mesh_dict()
    state = 16 * self.params / (d['fsdp'] * d['tensor'] * d['expert'])
    rows = self.config.train.batch_size / (d['data'] * d['fsdp'] * plan.grad_accum)
    tokens = rows * self.config.data.seq_len / d['context']
    return state, tokens * m.d_model * m.num_layers / d['tensor']

  def observe(self, plan: Plan, peak_bytes: float) -> None:
    state, units = self._terms(plan)
    self.rates[plan.recompute].append(max(0.0, peak_bytes - state) / units)

  def rate(self, level: str) -> float:
    if self.rates[level]:
      return float(sorted(self.rates[level])[len(self.rates[level]) // 2])
    known = [(other, r) for other, rs in self.rates.items() for r in rs]
    if not known:
      return 0.0  # nothing compiled yet: the state alone
    return float(sorted(r / KEPT[other] for other, r in known)[len(known) // 2]) * KEPT[level]

  def predict(self, plan: Plan) -> float:
    state, units = self._terms(plan)
    return state + self.rate(plan.recompute) * units


def seconds(flops_per_step: float, comm_bytes: float, plan: Plan, target: aot.Target) -> float:
  peak, link = speeds(target)
  return flops_per_step / (len(target.devices) * peak) + comm_bytes / link


def depths(config: ml_collections.ConfigDict) -> tuple[int, int, float]:
  """Two reduced depths that repeat the layer pattern once and twice, and how many repeats the full
  depth holds."""
  m = config.model
  lead, period = (m.moe.first_dense, m.moe.every) if m.mlp == 'moe' else (0, 1)
  small, large = lead + period, lead + 2 * period
  if large > m.num_layers:
    return m.num_layers, m.num_layers, 1.0
  return small, large, (m.num_layers - lead) / period


def evaluate(config: ml_collections.ConfigDict, plan: Plan, target: aot.Target, compile_fn) -> dict:
  """Peak memory and collective bytes per device at full depth, extrapolated from two compiles."""
  small, large, repeats = depths(config)
  reports = []
  for layers in sorted({small, large}):
    c = plan.apply(config)
    c.model.num_layers = layers
    reports.append(compile_fn(c))
  if not all(r['compiled'] for r in reports):
    return {'compiled': False, 'error': next(r['error'] for r in reports if not r['compiled'])}

  def extrapolate(value):
    a, b = value(reports[0]), value(reports[-1])
    return a + (b - a) * (repeats - 1)
  return {'compiled': True, 'peak_bytes': extrapolate(lambda r: r['memory_per_device']['peak_bytes']),
          'collective_bytes': extrapolate(lambda r: r['collectives']['bytes_per_device']),
          'compile_seconds': sum(r['compile_seconds'] for r in reports),
          'kernels': sorted({k['name'] for k in reports[-1].get('kernels', [])})}


def search(config: ml_collections.ConfigDict, target: aot.Target, compile_fn, *, limit_bytes: int,
           max_compiles: int = 24, enough: int = 4, log=print, confirm_fn=None) -> dict:
  """The search above. `compile_fn(config) -> report` is `compile.compile_config` bound to the target,
  `confirm_fn` the same for the full-depth confirmation (default: `compile_fn`). Stops after
  `max_compiles` plans or once `enough` fit; returns the chosen plan, its full-depth report and every
  tried plan."""
  num_devices = len(target.devices)
  plans = candidate_plans(config, num_devices, target.num_hosts)
  if not plans:
    raise ConfigError(f'no mesh of {num_devices} devices splits train.batch_size={config.train.batch_size} '
                      f'(and the heads, experts) evenly; change the batch size or the target')
  work = {level: step_flops(config, level) for level in RECOMPUTE}
  params = flops.param_counts(config.model)['total_params']
  prior = {p: seconds(work[p.recompute], prior_bytes(config, p, params), p, target) for p in plans}
  remaining = sorted(plans, key=lambda p: (prior[p], RECOMPUTE.index(p.recompute), p.grad_accum))
  memory = MemoryModel(config, params)
  tried, failed, fitting = [], [], []
  while remaining and len(tried) < max_compiles and len(fitting) < enough:
    # The cheapest plan the memory model expects to fit; while it expects none, the one it expects to
    # need least (so the model learns where memory goes).
    viable = [p for p in remaining if memory.predict(p) <= 1.05 * limit_bytes]
    plan = viable[0] if viable else min(remaining, key=memory.predict)
    result = evaluate(config, plan, target, compile_fn)
    row = {'plan': plan.describe(), 'overrides': plan.overrides(), 'grad_accum': plan.grad_accum,
           'prior_seconds': prior[plan], 'predicted_peak_bytes': memory.predict(plan), **result}
    if result['compiled']:
      row['fits'] = result['peak_bytes'] <= limit_bytes
      row['estimated_seconds'] = seconds(work[plan.recompute], result['collective_bytes'], plan, target)
      memory.observe(plan, result['peak_bytes'])
      (fitting if row['fits'] else failed).append(plan)
    else:
      row['fits'] = False
      failed.append(plan)
    tried.append(row)
    log(_line(row))
    # Drop what cannot fit where a plan saving more did not, or costs more than one that fits.
    remaining = [p for p in remaining if p != plan and not any(p.saves_no_more_than(f) for f in failed)
                 and not any(f.saves_no_more_than(p) for f in fitting)]
  ranked = sorted((r for r in tried if r['fits']), key=lambda r: (r['estimated_seconds'], r['grad_accum']))
  for row in ranked:  # confirm at full depth
    plan = next(p for p in fitting if p.describe() == row['plan'])
    report = (confirm_fn or compile_fn)(plan.apply(config))
    row['confirmed_peak_bytes'] = report['memory_per_device'].get('peak_bytes')
    log(f'full depth: {row["plan"]}: ' + (f'{report["memory_per_device"]["peak_bytes"] / aot.GIB:.1f} GiB'
                                          if report['compiled'] else report['error']))
    if report['fits']:
      return {'plan': row['plan'], 'overrides': row['overrides'], 'report': report, 'tried': tried}
  best = min((r for r in tried if r['compiled']), key=lambda r: r['peak_bytes'], default=None)
  if best is None:
    raise ConfigError(f'no plan compiled for {target.name}: {tried[0]["error"] if tried else "none tried"}')
  need = math.ceil(num_devices * best['peak_bytes'] / limit_bytes)
  raise ConfigError(
      f'no plan fits {target.name} in {len(tried)} compiles: the least memory was '
      f'{best["peak_bytes"] / aot.GIB:.1f} GiB per device ({best["plan"]}) against '
      f'{limit_bytes / aot.GIB:.1f} GiB; try about {need} devices, a smaller train.batch_size, or more '
      f'--fit_compiles')


def _line(row: dict) -> str:
  if not row['compiled']:
    return f'  {row["plan"]}: did not compile: {row["error"]}'
  return (f'  {row["plan"]}: {row["peak_bytes"] / aot.GIB:.1f} GiB per device '
          f'({"fits" if row["fits"] else "too big"}), {row["collective_bytes"] / 1e9:.2f} GB sent, '
          f'~{row["estimated_seconds"]:.3f} s a step')
