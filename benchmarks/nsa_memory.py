"""Train-step memory of NSA against dense attention as the sequence grows, compiled for accelerators
that are not here (NSA-linear-memory issue): temporary bytes per device of the `nsa_30m` and `dense_30m`
train steps at one sequence per device.

    python benchmarks/nsa_memory.py [--targets=h100,v5p:2x2x1] [--lengths=8192,16384,32768,65536]

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
_OUT = flags.DEFINE_string('out', 'results/compile/nsa_memory.jsonl', 'JSON lines, one per compile.')
_KINDS = ('dense', 'nsa')


def overrides(target: str, seq_len: int) -> tuple[str, ...]:
  devices = 1 if ':' not in target else 4
  return (f'--config.data.seq_len={seq_len}', f'--config.train.batch_size={devices}',
          f'--config.mesh.data={devices}', '--config.mesh.fsdp=1', '--config.mesh.tensor=1',
          '--config.mesh.expert=1')


def table(rows: dict) -> str:
  lines = ['| target | T | dense temp GiB | NSA temp GiB | NSA / dense | NSA growth per 4x T | NSA peak GiB '
           '| NSA fits |', '|---|---|---|---|---|---|---|---|']
  gib = 2**30
  for target in _TARGETS.value:
    for T in map(int, _LENGTHS.value):
      dense, nsa = (rows.get((kind, target, T)) for kind in _KINDS)
      if not (dense and nsa and dense.get('memory_per_device') and nsa.get('memory_per_device')):
        lines.append(f'| {target} | {T} | | | | | | no: {(nsa or {}).get("error")} |')
        continue
      d, n = dense['memory_per_device']['temp_bytes'], nsa['memory_per_device']['temp_bytes']
      quarter = rows.get(('nsa', target, T // 4), {}).get('memory_per_device')
      growth = f'{n / quarter["temp_bytes"]:.2f}x' if quarter else ''
      lines.append(f'| {target} | {T} | {d / gib:.2f} | {n / gib:.2f} | {n / d:.2f} | {growth} | '
                   f'{nsa["memory_per_device"]["peak_bytes"] / gib:.2f} | {"yes" if nsa["fits"] else "no"} |')
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  out = REPO / _OUT.value
  rows = {(r['kind'], r['target'], r['seq_len']): r for r in read_rows(out)}
  for target in _TARGETS.value:
    for T in map(int, _LENGTHS.value):
      for kind in _KINDS:
        if (kind, target, T) in rows:
          continue
        r = run_compile(f'{kind}_30m', f'configs/{kind}_30m.py', overrides(target, T), target)
        r.update(kind=kind, seq_len=T, target=target)
        record(out, r, 'kind', 'target', 'seq_len', 'compiled', 'fits')
        rows[(kind, target, T)] = r
  print(table(rows))


if __name__ == '__main__':
  app.run(main)
