"""IsoFLOP sweeps over the dense ladder's recipe: plan the runs, print or run them, collect the results.

Driven from `python -m sparse_lm.scaling sweep|collect` (see there). A budget C gets model sizes spaced
evenly in log N around its optimum; each size is a (num_layers, d_model) shape interpolated between the
ladder's rungs with the ladder's recipe, and trains for C / flops_per_token tokens, FLOPs per token
counted by `sparse_lm.flops` (attention included). Each run lives in
`ROOT/{variant}_C{budget}_L{layers}_d{width}`.

`collect` records `N` as the total parameter count, embeddings included, as Hoffmann et al. 2022 do;
Kaplan et al. 2020 drop embeddings, and Pearce & Song 2024 trace much of the gap between the two papers'
exponents to that choice at small scale. The non-embedding and active counts are written beside it.
"""

import dataclasses
import functools
import json
import math
import pathlib
import re
import shlex
import subprocess
import sys

import ml_collections
import numpy as np

from sparse_lm import attention, flops, ladder, mlp, optim, tokenizer
from sparse_lm.errors import ConfigError
from sparse_lm.model import is_causal

REPO = pathlib.Path(__file__).resolve().parents[1]

_RUN_NAME = re.compile(r'^(?P<variant>.+)_C(?P<budget>[0-9.e+-]+)_L(?P<layers>\d+)_d(?P<width>\d+)$')


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  variant: str
  budget: float
  config: ml_collections.ConfigDict
  base_file: str  # the ladder config file the command starts from
  overrides: dict  # flattened key -> value, on top of `base_file`

  def command(self, workdir_root) -> list[str]:
    flags = [f'--config.{k}={_flag_value(v)}' for k, v in self.overrides.items()]
    return ['python', 'train.py', f'--config={self.base_file}',
            f'--workdir={pathlib.Path(workdir_root) / self.name}', *flags]


# ----------------------------------------------------------------------------- shapes

def to_variant(c: ml_collections.ConfigDict, variant: str, *, small: bool) -> None:
  """Turns a dense config into `variant` in place: a `ladder.VARIANTS` recipe (NSA at equal parameters,
  MoSA at equal attention FLOPs, ...), or else any attention or MLP name set as it is."""
  if variant in ladder.VARIANTS:
    ladder.VARIANTS[variant](c, small=small)
  elif variant in attention.REGISTRY:
    c.model.attention = variant
  elif variant in mlp.REGISTRY:
    c.model.mlp = variant
  else:
    known = sorted({*ladder.VARIANTS, *attention.REGISTRY, *mlp.REGISTRY})
    raise ConfigError(f'--variant={variant!r} is not one of {known}')


def with_vocab(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose `model.vocab_size` is the tokenizer's, as the trainer fixes it, for counting."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.vocab_size = c.model.vocab_size or tokenizer.vocab_size_for(c)
  return c


@functools.cache
def rung_params() -> dict[str, int]:
  return {name: flops.param_counts(with_vocab(ladder.dense_config(name)).model)['total_params']
          for name in ladder.RUNGS}


def shape_for(params: float) -> tuple[str, int, int]:
  """(template rung, num_layers, d_model) near `params`: log-linear interpolation of depth and width
  between the two rungs around it (extrapolating the end segments), width rounded to whole heads."""
  names = sorted(ladder.RUNGS, key=rung_params().get)
  logp_K = np.log([rung_params()[n] for n in names])
  i = int(np.clip(np.searchsorted(logp_K, math.log(params)) - 1, 0, len(names) - 2))
  t = (math.log(params) - logp_K[i]) / (logp_K[i + 1] - logp_K[i])
  lo, hi = ladder.RUNGS[names[i]], ladder.RUNGS[names[i + 1]]
  template = names[i] if t < 0.5 else names[i + 1]
  head_dim = _head_dim(template)
  width = math.exp((1 - t) * math.log(lo.d_model) + t * math.log(hi.d_model))
  depth = math.exp((1 - t) * math.log(lo.num_layers) + t * math.log(hi.num_layers))
  return template, max(1, round(depth)), max(1, round(width / head_dim)) * head_dim


def _head_dim(rung: str) -> int:
  r = ladder.RUNGS[rung]
  return r.d_model // r.num_heads


def sized_config(variant: str, template: str, num_layers: int, d_model: int) -> ml_collections.ConfigDict:
  """The template rung's dense config (optimiser, data, batch) at another depth and width, shaped by
  the ladder's recipe (`ladder.apply_shape`) with the rung's head_dim, then turned into `variant` at
  that size (so NSA's narrower MLP and MoSA's isoFLOP head count are computed for the new shape)."""
  c = ladder.dense_config(template)
  num_heads = d_model // _head_dim(template)
  ladder.apply_shape(c, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
                     num_kv_heads=math.gcd(ladder.RUNGS[template].num_kv_heads, num_heads))
  to_variant(c, variant, small=template in ladder.CPU_RUNGS)
  return c


# ----------------------------------------------------------------------------- planning

def plan(budgets, n_center, *, sizes_per_budget=5, spread=4.0, variant='dense', sets=()) -> list[Run]:
  """IsoFLOP runs: per budget, sizes from n_center(C) / spread to n_center(C) * spread evenly in log N.

  Shapes that round to the same (depth, width) are kept once. `sets` are extra KEY=VALUE overrides
  applied to every run before its FLOPs are counted.
  """
  runs = []
  for budget in budgets:
    seen = set()
    offsets = np.linspace(-1, 1, sizes_per_budget) if sizes_per_budget > 1 else np.zeros(1)  # 1: the centre
    for n in n_center(budget) * spread ** offsets:
      template, num_layers, d_model = shape_for(n)
      if (num_layers, d_model) not in seen:
        seen.add((num_layers, d_model))
        runs.append(_planned(variant, budget, template, num_layers, d_model, sets))
  return runs


def _planned(variant, budget, template, num_layers, d_model, sets) -> Run:
  c = sized_config(variant, template, num_layers, d_model)
  for assignment in sets:
    apply_override(c, assignment)
  t = c.train
  fpt = flops.flops_per_token(with_vocab(c))['flops_per_token']['total']
  t.steps = max(1, round(budget / fpt / (t.batch_size * c.data.seq_len)))
  t.warmup_steps = optim.short_run_warmup(t.steps, t.warmup_steps)
  return Run(name=f'{variant}_C{budget:.3g}_L{num_layers}_d{d_model}', variant=variant, budget=budget,
             config=c, base_file=f'configs/dense_{template}.py',
             overrides=_diff(ladder.dense_config(template), c))


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
  """KEY=VALUE with a dotted key, the value parsed as the type the key already has."""
  key, value = assignment.split('=', 1)
  *parents, leaf = key.split('.')
  node = functools.reduce(getattr, parents, config)
  old = getattr(node, leaf)
  if isinstance(old, bool):
    setattr(node, leaf, value.lower() in ('1', 'true'))
  else:
    setattr(node, leaf, type(old)(value) if old is not None else value)


def _flatten(d: dict, prefix='') -> dict:
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(_flatten(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def _diff(base: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> dict:
  old, new = _flatten(base.to_dict()), _flatten(config.to_dict())
  return {k: v for k, v in new.items() if old.get(k) != v}


def _flag_value(v) -> str:
  return repr(v) if isinstance(v, float) else str(v)


def chinchilla_center(tokens_per_param: float = ladder.TOKENS_PER_PARAM):
  """N with D = tokens_per_param * N and C = 6 N D (Hoffmann et al. 2022: about 20 tokens per parameter)."""
  return lambda c: math.sqrt(c / (6 * tokens_per_param))


# ----------------------------------------------------------------------------- running

def final_eval(workdir, steps: int) -> dict | None:
  """The evaluation line at `steps` in `workdir/metrics.jsonl`, or None if the run has not got there."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return None
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  finals = [r for r in rows if r.get('step') == steps and 'eval_loss' in r]
  return finals[-1] if finals else None


def execute(runs: list[Run], workdir_root, *, run: bool) -> None:
  """Prints (or runs, one after another) the command of each run not yet finished."""
  for r in runs:
    if final_eval(pathlib.Path(workdir_root) / r.name, r.config.train.steps) is not None:
      print(f'# finished, skipped: {r.name}', file=sys.stderr)
      continue
    command = r.command(workdir_root)
    print(shlex.join(command), flush=True)
    if run:
      subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True)


# ----------------------------------------------------------------------------- collecting

def collect(workdir_root) -> list[dict]:
  """One record per finished run under `workdir_root`; unfinished ones are named on stderr."""
  records = []
  for path in sorted(pathlib.Path(workdir_root).glob('*/config.json')):
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    final = final_eval(path.parent, config.train.steps)
    if final is None:
      print(f'# unfinished, left out: {path.parent.name}', file=sys.stderr)
      continue
    record = run_record(path.parent.name, config, final)
    records.append({**record, **_measured_leak(path.parent, record['step'])})
  return records


def _measured_leak(workdir: pathlib.Path, step: int) -> dict:
  """The newest causality probe `sparse_lm.evaluate` wrote for the final checkpoint, if any."""
  path = workdir / 'eval.jsonl'
  lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
  probes = [line for line in lines if line.get('step') == step and 'causality_leak' in line]
  return {'causality_leak': probes[-1]['causality_leak']} if probes else {}


def run_record(name: str, config: ml_collections.ConfigDict, final: dict) -> dict:
  """N (total parameters), D (tokens), C (training FLOPs with attention), C_6ND, the final losses, and
  whether the architecture is causal (a non-causal model's loss is not a language model's)."""
  counts = flops.flops_per_token(with_vocab(config))
  fpt = counts['flops_per_token']
  tokens = config.train.steps * config.train.batch_size * config.data.seq_len
  match = _RUN_NAME.match(name)
  n = counts['total_params']
  return dict(
      name=name, variant=match['variant'] if match else _variant_of(config),
      budget=float(match['budget']) if match else None,
      N=n, N_non_embedding=counts['non_embedding_params'], N_active=counts['active_params'], D=tokens,
      C=fpt['total'] * tokens, C_params=fpt['params'] * tokens, C_6ND=6 * n * tokens,
      flops_per_token=fpt['total'], loss=final['eval_loss'], bpb=final.get('eval_bpb'),
      step=final['step'], num_layers=config.model.num_layers, d_model=config.model.d_model,
      causal=is_causal(config.model))


def _variant_of(config) -> str:
  m = config.model
  return m.attention if m.mlp == 'dense' else (m.mlp if m.attention == 'dense' else f'{m.attention}+{m.mlp}')
