"""Train-step memory of NSA against dense attention as the sequence grows, compiled for accelerators
that are not here (NSA-linear-memory issue): temporary bytes per device of the `nsa_30m` and `dense_30m`
train steps at one sequence per device, and of `nsa_30m` with `model.remat_attention=true` (each attention
sublayer's forward run again in the backward, which then keeps only the sublayer's input).

    python benchmarks/nsa_memory.py [--targets=h100,v5p:2x2x1] [--lengths=8192,16384,32768,65536]
        [--kinds=dense,nsa,nsa_remat]

On `h100` a batch of 1; on a TPU slice (the smallest v5p slice has 4 chips) one sequence per chip over
`mesh.data`. One JSON line per compile in `--out` (resumable, like benchmarks/compile_configs.py), then a
table: temporary and peak GiB per device, NSA / dense, and growth per 4x tokens. Compiles, not runs.
"""


from absl import app, flags
from compile_runs import (  # this folder, which a script run puts first on sys.path
  REPO,
  read_rows,
  record,
  run_compile,
)

_TARGETS = flags.DEFINE_list('targets', ['h100', 'v5p:2x2x1'], 'Targets to compile for.')
_LENGTHS = flags.DEFINE_list('lengths', ['8192', '16384', '32768', '65536'], 'Sequence lengths.')
_ONLY = flags.DEFINE_list('kinds', None, 'Kinds to compile (default: all); the table shows all recorded.')
_OUT = flags.DEFINE_string('out', 'results/compile/nsa_memory.jsonl', 'JSON lines, one per compile.')
# kind -> (config, extra overrides)
_KINDS = {'dense': ('dense_30m', ()), 'nsa': ('nsa_30m', ()),
          'nsa_remat': ('nsa_30m', ('--config.model.remat_attention=true',))}


def overrides(target: str, seq_len: int) -> tuple[str, ...]:
  devices = 1 if ':' not in target else 4
  return (f'--config.data.seq_len={seq_len}', f'--config.train.batch_size={devices}',
          f'--config.mesh.data={devices}', '--config.mesh.fsdp=1', '--config.mesh.tensor=1',
          '--config.mesh.expert=1')


def table(rows: dict) -> str:
  lines = ['| target | T | kind | temp GiB | / dense | growth per 4x T | peak GiB | fits |',
           '|---|---|---|---|---|---|---|---|']
  gib = 2**30
  for target in _TARGETS.value:
    for T in map(int, _LENGTHS.value):
      dense = (rows.get(('dense', target, T)) or {}).get('memory_per_device')
      for kind in _KINDS:
        row = rows.get((kind, target, T))
        if not (row and row.get('memory_per_device')):
          lines.append(f'| {target} | {T} | {kind} | | | | | no: {(row or {}).get("error")} |')
          continue
        m = row['memory_per_device']
        quarter = (rows.get((kind, target, T // 4)) or {}).get('memory_per_device')
        growth = f'{m["temp_bytes"] / quarter["temp_bytes"]:.2f}x' if quarter else ''
        ratio = f'{m["temp_bytes"] / dense["temp_bytes"]:.2f}' if dense else ''
        lines.append(f'| {target} | {T} | {kind} | {m["temp_bytes"] / gib:.2f} | {ratio} | {growth} | '
                     f'{m["peak_bytes"] / gib:.2f} | {"yes" if row["fits"] else "no"} |')
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  out = REPO / _OUT.value
  rows = {(r['kind'], r['target'], r['seq_len']): r for r in read_rows(out)}
  for target in _TARGETS.value:
    for T in map(int, _LENGTHS.value):
      for kind, (config, extra) in _KINDS.items():
        if (kind, target, T) in rows or kind not in (_ONLY.value or _KINDS):
          continue
        r = run_compile(config, f'configs/{config}.py', (*overrides(target, T), *extra), target)
        r.update(kind=kind, seq_len=T, target=target)
        record(out, r, 'kind', 'target', 'seq_len', 'compiled', 'fits')
        rows[(kind, target, T)] = r
  print(table(rows))


if __name__ == '__main__':
  app.run(main)
