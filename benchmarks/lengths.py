"""The longest sequence each variant's 100m config trains at on 8 devices, with and without context
parallelism: compiled, not run.

    python benchmarks/lengths.py [--targets=h100x8,v5p:2x2x2] [--variants=dense,nsa,moba,dsa]
        [--start=8192] [--stop=1048576] [--splits=1,8] [--out=results/compile/lengths.jsonl]
        [--plot=benchmarks/lengths.png] [--full_depth]

For each target, variant and split (`mesh.context`: 1 is 8-way data parallelism, one sequence per
device; 8 is one sequence over all 8 devices; on v5p:2x2x2, two hosts of 4 chips that each load their
own rows, 4 is one sequence per host), the sequence doubles from `--start` until the train step
no longer fits (or `--stop`). Every step recomputes whole blocks in the backward (`model.remat`, the least
activation memory the project offers) with packing off (`data.packing=concat`); each length is compiled
at one and two layers and extrapolated to the full 16 (`sparse_lm.plan.evaluate`, within about 5% of a
full compile on the configs checked, BENCHMARKS.md), or with `--full_depth` compiled whole (on v5p the
extrapolation misleads: peaks that fall as the sequence doubles). A variant that does not run split is
skipped at `mesh.context > 1`. One JSON line per compile (peak per device, its limit, collective bytes
per device, the kernels); the plot shows peak memory against length.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_lm import aot, attention, ladder, sharding  # noqa: E402
from sparse_lm import compile as compile_lib  # noqa: E402
from sparse_lm import plan as plan_lib  # noqa: E402
from sparse_lm.errors import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def rung_config(variant: str):
  """The 100m rung as `configs/<variant>_100m.py` ships it."""
  return (ladder.dense_config if variant == 'dense' else ladder.nsa_config if variant == 'nsa'
          else lambda rung: ladder.variant_config(rung, variant))('100m')


def _full_depth(config, plan, target_name: str, fraction: float) -> dict:
  """`plan_lib.evaluate`'s result from one compile of the whole model."""
  report = compile_lib.compile_config(plan.apply(config), target_name, memory_fraction=fraction)
  if not report['compiled']:
    return {'compiled': False, 'error': report['error']}
  return {'compiled': True, 'peak_bytes': report['memory_per_device']['peak_bytes'],
          'collective_bytes': report['collectives']['bytes_per_device'],
          'kernels': sorted({k['name'] for k in report['kernels']})}


def row_for(variant: str, target_name: str, split: int, length: int, fraction: float,
            full_depth: bool = False) -> dict:
  config = rung_config(variant)
  with config.unlocked():
    config.data.seq_len = length
    config.data.packing = 'concat'
    config.train.batch_size = DEVICES // split
  mesh = tuple({'data': DEVICES // split, 'context': split}.get(axis, 1) for axis in sharding.MESH_AXES)
  plan = plan_lib.Plan(mesh=mesh, recompute='block', grad_accum=1)
  target = aot.get_target(target_name)
  limit = int(fraction * target.memory_bytes)
  row = {'variant': variant, 'target': target_name, 'context': split, 'seq_len': length,
         'plan': plan.describe(), 'limit_gib': round(limit / aot.GIB, 2),
         'depth': 'full' if full_depth else 'extrapolated'}
  start = time.time()
  try:
    got = (_full_depth(config, plan, target_name, fraction) if full_depth else plan_lib.evaluate(
        config, plan, target, lambda c: compile_lib.compile_config(c, target_name, memory_fraction=fraction)))
  except ConfigError as error:
    return {**row, 'compiled': False, 'error': str(error)}
  row['seconds'] = round(time.time() - start, 1)
  if not got['compiled']:
    return {**row, 'compiled': False, 'error': got['error']}
  return {**row, 'compiled': True, 'peak_gib': round(got['peak_bytes'] / aot.GIB, 2),
          'fits': got['peak_bytes'] <= limit, 'collectives_gb': round(got['collective_bytes'] / 1e9, 3),
          'kernels': got['kernels']}


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  targets = sorted({r['target'] for r in rows})
  fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
  for ax, target in zip(axes[0], targets, strict=True):
    series = sorted({(r['variant'], r['context']) for r in rows if r['target'] == target})
    for variant, split in series:
      pts = sorted((r['seq_len'], r['peak_gib']) for r in rows if r['target'] == target
                   and r['variant'] == variant and r['context'] == split and r.get('compiled'))
      if pts:
        colour = f'C{sorted({r["variant"] for r in rows}).index(variant)}'  # one colour a variant
        ax.plot(*zip(*pts, strict=True), marker='o', linestyle='-' if split == 1 else '--', color=colour,
                label=f'{variant}, context {split}')
    limits = {r['limit_gib'] for r in rows if r['target'] == target}
    for limit in limits:
      ax.axhline(limit, color='grey', linewidth=0.8)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log', base=2)
    ax.set_xlabel('tokens per sequence')
    ax.set_ylabel('peak GiB per device (compiled, not run)')
    ax.set_title(f'100m rung on {target}, 8 devices')
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--targets', default='h100x8')
  parser.add_argument('--variants', default='dense,nsa,moba,dsa')
  parser.add_argument('--splits', default='1,8')
  parser.add_argument('--start', type=int, default=8192)
  parser.add_argument('--stop', type=int, default=1 << 20)
  parser.add_argument('--memory_fraction', type=float, default=0.9)
  parser.add_argument('--out', default=os.path.join(REPO, 'results', 'compile', 'lengths.jsonl'))
  parser.add_argument('--plot', default=os.path.join(REPO, 'benchmarks', 'lengths.png'))
  parser.add_argument('--plot_only', action='store_true', help='redraw the plot from --out')
  parser.add_argument('--full_depth', action='store_true',
                      help='compile all 16 layers instead of extrapolating from one and two (minutes a '
                           'length on v5p, where the extrapolation misleads)')
  args = parser.parse_args()
  if not args.plot_only:
    for target in args.targets.split(','):
      for variant in args.variants.split(','):
        for split in map(int, args.splits.split(',')):
          config = rung_config(variant)
          if split > 1 and not attention.every_layer(config.model, 'context_parallel'):
            print(f'{variant}: does not run split; skipped at context {split}', file=sys.stderr)
            continue
          length = args.start
          while length <= args.stop:
            row = row_for(variant, target, split, length, args.memory_fraction, args.full_depth)
            print(json.dumps(row), flush=True)
            with open(args.out, 'a') as f:
              f.write(json.dumps(row) + '\n')
            if not (row['compiled'] and row['fits']):
              break
            length *= 2
  with open(args.out) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  plot(rows, args.plot)


if __name__ == '__main__':
  main()
