"""Compiles every shipped accelerator config for GPU and TPU targets (no hardware needed) and prints the
"compiled, not run" tables of BENCHMARKS.md: per-device peak memory, fits, compile time, and every
kernel's registers, shared memory and spills (GPU) or scoped VMEM (TPU).

    python benchmarks/compile_configs.py --targets=h100x8,v5p:2x2x2 --out=results/compile/configs.jsonl

Each compile runs `python -m sparse_lm.compile` in its own process (one JSON line each in `--out`,
appended as it goes, so an interrupted sweep keeps what it measured and `--resume` skips it). These are
compiles, not runs: no time is inferred from them.
"""


from absl import app, flags
from compile_runs import (  # this folder, which a script run puts first on sys.path
  REPO,
  read_rows,
  record,
  run_compile,
)

_TARGETS = flags.DEFINE_list('targets', ['h100x8', 'v5p:2x2x2'], 'Targets to compile for.')
_OUT = flags.DEFINE_string('out', 'results/compile/configs.jsonl', 'JSON lines, one per compile.')
_ONLY = flags.DEFINE_list('only', None, 'Names of the cases to compile (default: all).')
_RESUME = flags.DEFINE_bool('resume', True, 'Skip cases already in --out.')

# name -> (config file, overrides). The rungs as shipped (their own batch, mesh.data over every device),
# then dense, NSA, MoBA and DSA 100m at 32K and 64K tokens, one sequence per device. `@blocks64`: DSA's
# selection in blocks of 64 tokens, its TPU route (token_attention has no TPU body).
LONG = ('--config.train.batch_size=8',)
BLOCKS = ('--config.model.dsa.block_size=64',)
CASES = {
    **{f'{kind}_{rung}': (f'configs/{kind}_{rung}.py', ())
       for rung in ('100m', '300m', '1b') for kind in ('dense', 'nsa', 'moe', 'moba', 'dsa')},
    **{f'{kind}_100m@{T // 1024}K': (f'configs/{kind}_100m.py', (*LONG, f'--config.data.seq_len={T}'))
       for T in (32768, 65536) for kind in ('dense', 'nsa', 'moba', 'dsa')},
    **{f'dsa_{rung}@blocks64': (f'configs/dsa_{rung}.py', BLOCKS) for rung in ('100m', '300m', '1b')},
    **{f'dsa_100m@{T // 1024}K@blocks64': ('configs/dsa_100m.py', (*LONG, f'--config.data.seq_len={T}',
                                                                   *BLOCKS))
       for T in (32768, 65536)},
}


def compile_case(name: str, target: str) -> dict:
  config, overrides = CASES[name]
  return run_compile(name, config, overrides, target)


def gib(n: int) -> str:
  return f'{n / 2**30:.2f}'


def table(rows: list[dict]) -> str:
  lines = ['| case | target | mesh (data, fsdp, tensor, expert) | peak GiB / device | device GiB | fits | '
           'compile s |', '|---|---|---|---|---|---|---|']
  for r in rows:
    if not r.get('memory_per_device'):
      lines.append(f"| {r['case']} | {r['target']} | | | | no: {r['error']} | |")
      continue
    mesh = ', '.join(str(r['mesh'][a]) for a in ('data', 'fsdp', 'tensor', 'expert'))
    m = r['memory_per_device']
    lines.append(f"| {r['case']} | {r['target']} | {mesh} | {gib(m['peak_bytes'])} | "
                 f"{gib(m['device_memory_bytes'])} | {'yes' if r['fits'] else 'no'} | "
                 f"{r['compile_seconds']} |")
  return '\n'.join(lines)


def kernel_table(rows: list[dict]) -> str:
  lines = ['| case | target | kernel | calls | registers | spill bytes (store/load) | shared memory bytes | '
           'scoped VMEM bytes |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    for k in r.get('kernels', []):
      spills = (f"{k['spill_store_bytes']}/{k['spill_load_bytes']}" if 'spill_store_bytes' in k else '')
      lines.append(f"| {r['case']} | {r['target']} | {k['name']} | {k['calls']} | {k.get('registers', '')} | "
                   f"{spills} | {k.get('shared_memory_bytes', '')} | {k.get('scoped_vmem_bytes', '')} |")
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  out = REPO / _OUT.value
  done = read_rows(out) if _RESUME.value else []
  seen = {(r['case'], r['target']) for r in done}
  for target in _TARGETS.value:
    for name in _ONLY.value or CASES:
      if (name, target) in seen:
        continue
      row = compile_case(name, target)
      record(out, row, 'case', 'target', 'compiled', 'fits', 'compile_seconds')
      done.append(row)
  print(table(done))
  print()
  print(kernel_table(done))


if __name__ == '__main__':
  app.run(main)
