"""The first-GPU check: one script, one JSON file, under 8 minutes on one H100.

    python benchmarks/gpu_check.py --out=results/gpu_check.json            # on a GPU
    python benchmarks/gpu_check.py --tiny --out=/tmp/gpu_check.json         # any machine: tiny shapes

1. Correctness on the real backend (what no interpreted run proves): every kernel's forward and
   backward against its XLA reference at small shapes, in bfloat16 on an accelerator (float32 on a
   CPU): flash attention (causal, windowed, with segment ids), compressed attention, block selection,
   selected attention, token attention and the grouped matmul. Each row: the largest absolute error
   of the output and of each input gradient, scaled by the reference's largest magnitude, and pass or
   fail against the dtype's tolerance.
2. Timings, the device synchronised (`block_until_ready`), median of `--repeats` after a warm-up:
   flash attention against cuDNN's (`jax.nn.dot_product_attention(implementation='cudnn')`), forward
   and forward+backward, at 8K-64K tokens; NSA's branches (compressed attention, block selection,
   selected attention, the window) and its whole layer, MoBA's and DSA's layers (forward+backward) at
   the longest length; decoding per token from a 64K cache (`benchmarks/decode.py`'s model and
   measurement) for dense, NSA, MoBA and DSA; and the dense 100m rung's train step: tokens/s and MFU
   against `--peak_tflops` (989, an H100 SXM's dense bfloat16).
Sections that would pass `--budget_s` are skipped and say so, so the JSON always comes back. `--tiny`
runs every section at toy shapes (interpret mode on a CPU), which the test suite does so that the first
GPU run does not fail on a typo; its timings mean nothing.
"""

import functools
import json
import pathlib
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # this folder's decode.py
import decode  # noqa: E402  pylint: disable=g-import-not-at-top
import timing  # noqa: E402  pylint: disable=g-import-not-at-top

from pallas_kernels.block_choice import select_blocks  # noqa: E402
from pallas_kernels.block_selection import block_selection  # noqa: E402
from pallas_kernels.compressed_attention import compressed_attention  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.grouped_matmul import grouped_matmul  # noqa: E402
from pallas_kernels.selected_attention import selected_attention  # noqa: E402
from pallas_kernels.token_attention import token_attention  # noqa: E402

_OUT = flags.DEFINE_string('out', 'results/gpu_check.json', 'The JSON file written.')
_TINY = flags.DEFINE_bool('tiny', False, 'Toy shapes everywhere (the test suite; any machine).')
_BUDGET = flags.DEFINE_float('budget_s', 450.0, 'Sections starting after this many seconds are skipped.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per point (median).')
_PEAK = flags.DEFINE_float('peak_tflops', 989.0, 'The device peak for MFU (dense bfloat16).')
_LENGTHS = flags.DEFINE_list('lengths', ['8192', '16384', '32768', '65536'], 'Attention timing lengths.')

_TOLERANCE = {'bfloat16': 2e-2, 'float32': 2e-4}


def _dtype():
  return timing.device_dtype()


def _normal(key, shape, dtype):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _median_s(fn, *args) -> float:
  return timing.median_seconds(fn, *args, repeats=_REPEATS.value)


# ----------------------------------------------------------------------------- 1. correctness

def _compare(kernel_fn, reference_fn, args, grad_argnums) -> dict:
  """Forward and (where `grad_argnums`) gradients of sum(out * g) for a fixed random g."""
  out_ref = jax.jit(reference_fn)(*args)
  g = jax.tree.map(lambda o: _normal(7, o.shape, jnp.float32) if jnp.issubdtype(o.dtype, jnp.floating)
                   else None, out_ref)

  def loss(fn, *a):
    outs = fn(*a)
    return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(jax.tree.leaves(outs), jax.tree.leaves(g),
                                                                    strict=True))
  row = {}
  out = jax.jit(kernel_fn)(*args)
  for i, (o, r) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(out_ref), strict=True)):
    if jnp.issubdtype(r.dtype, jnp.integer):
      row[f'out{i}_mismatch_share'] = float(jnp.mean(o != r))
    else:
      row[f'out{i}_err'] = _scaled_err(o, r)
  if grad_argnums:
    grads = jax.jit(jax.grad(functools.partial(loss, kernel_fn), argnums=grad_argnums))(*args)
    grads_ref = jax.jit(jax.grad(functools.partial(loss, reference_fn), argnums=grad_argnums))(*args)
    for i, gk, gr in zip(grad_argnums, grads, grads_ref, strict=True):
      row[f'd{i}_err'] = _scaled_err(gk, gr)
  return row


def _scaled_err(x, ref) -> float:
  """Largest |x - ref| over the reference's largest finite magnitude; equal entries (a log-sum-exp's
  -inf where a query sees nothing) count 0, an infinity or NaN against a number counts inf."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  with np.errstate(invalid='ignore'):
    diff = np.where(x == ref, 0.0, np.abs(x - ref))
  diff = np.where(np.isnan(diff), np.inf, diff)
  finite = np.abs(ref[np.isfinite(ref)])
  return float(np.max(diff, initial=0.0) / max(float(np.max(finite, initial=0.0)), 1e-6))


def _lists(key, B, T, K, n, num_blocks, block_size):
  """Random NSA-style block lists `[B, T, K, n]` (first and local blocks forced)."""
  score = _normal(key, (B, T, K, num_blocks), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  return select_blocks(score, pos, num_selected=n, block_size=block_size)


def correctness(tiny: bool) -> list[dict]:
  dt = _dtype()
  B, T, H, K, D = (1, 64, 4, 2, 16) if tiny else (2, 1024, 16, 2, 128)
  q, k, v = _normal(1, (B, T, H, D), dt), _normal(2, (B, T, K, D), dt), _normal(3, (B, T, K, D), dt)
  seg = jnp.asarray(np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0), jnp.int32)
  l, d, sel, n = (4, 2, 8, 3) if tiny else (32, 16, 64, 16)
  C = (T - l) // d + 1
  ck, cv = _normal(4, (B, C, K, D), dt), _normal(5, (B, C, K, D), dt)
  nsa = dict(cmp_block=l, cmp_stride=d)
  flash = functools.partial(functools.partial, flash_attention)
  cases = {
      'flash_causal': (lambda impl: flash(implementation=impl), (q, k, v)),
      'flash_window': (lambda impl: flash(window=T // 4, implementation=impl), (q, k, v)),
      'flash_segments': (lambda impl: flash(segment_ids=seg, implementation=impl), (q, k, v)),
      'compressed_attention': (lambda impl: functools.partial(compressed_attention, implementation=impl,
                                                              **nsa), (q, ck, cv)),
  }
  rows = []
  for name, (make, args) in cases.items():
    rows.append(_checked(name, make, args, (0, 1, 2), dt))
  lse = compressed_attention(q, ck, cv, implementation='xla', **nsa)[1]
  rows.append(_checked('block_selection', lambda impl: functools.partial(
      block_selection, implementation=impl, sel_block=sel, num_selected=n, **nsa), (q, ck, lse), (), dt))
  idx = _lists(6, B, T, K, n, T // sel, sel)
  rows.append(_checked('selected_attention', lambda impl: functools.partial(
      selected_attention, block_size=sel, implementation=impl), (q, k, v, idx), (0, 1, 2), dt))
  tok = _lists(8, B, T, 1, min(T, 8 if tiny else 256), T, 1)
  token = functools.partial(functools.partial, token_attention)
  rows.append(_checked('token_attention', lambda impl: token(implementation=impl),
                       (q, k, v, tok), (0, 1, 2), dt))
  M, Kd, N, G = (64, 32, 32, 4) if tiny else (4096, 512, 1024, 8)
  cuts = np.sort(np.r_[0, np.random.default_rng(0).integers(0, M, G - 1), M])
  sizes = jnp.asarray(np.diff(cuts), jnp.int32)
  rows.append(_checked('grouped_matmul', lambda impl: functools.partial(grouped_matmul, implementation=impl),
                       (_normal(9, (M, Kd), dt), _normal(10, (G, Kd, N), dt), sizes), (0, 1), dt))
  return rows


def _checked(name, make, args, grad_argnums, dt) -> dict:
  try:
    row = {'kernel': name, 'dtype': jnp.dtype(dt).name,
           **_compare(make('pallas'), make('xla'), args, grad_argnums)}
    errs = [v for key, v in row.items() if key.endswith('_err') or key.endswith('_share')]
    # Block choices may differ on near-ties in low precision: a small share is allowed there.
    tol = _TOLERANCE[jnp.dtype(dt).name]
    row['passed'] = all(v <= (0.01 if str(key).endswith('share') else tol)
                        for key, v in row.items() if key.endswith(('_err', '_share')))
    row['max_err'] = max(errs) if errs else 0.0
  except Exception as e:  # pylint: disable=broad-except  (the report must come back)
    row = {'kernel': name, 'passed': False, 'error': f'{type(e).__name__}: {e}'[:2000],
           'trace': traceback.format_exc()[-2000:]}
  print(json.dumps(row), flush=True)
  return row


# ----------------------------------------------------------------------------- 2. timings

def attention_timings(tiny: bool, lengths: list[int]) -> list[dict]:
  dt = _dtype()
  H, K, D = (4, 2, 16) if tiny else (16, 2, 128)
  rows = []
  impls = {'pallas': functools.partial(flash_attention, implementation='pallas')}
  if jax.default_backend() == 'gpu':
    for name in ('cudnn', 'xla'):
      impls[f'dpa_{name}'] = functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                               implementation=name)
  for T in lengths:
    q, k, v = _normal(1, (1, T, H, D), dt), _normal(2, (1, T, K, D), dt), _normal(3, (1, T, K, D), dt)
    flops_fwd = 4 * T * (T + 1) / 2 * H * D
    for name, fn in impls.items():
      row = {'case': 'flash_attention', 'impl': name, 'T': T}
      try:
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                               argnums=(0, 1, 2)))
        row['fwd_ms'] = 1e3 * _median_s(fwd, q, k, v)
        row['fwd_bwd_ms'] = 1e3 * _median_s(bwd, q, k, v)
        row['fwd_tflops'] = flops_fwd / row['fwd_ms'] / 1e9
        row['fwd_bwd_tflops'] = 3.5 * flops_fwd / row['fwd_bwd_ms'] / 1e9
      except Exception as e:  # pylint: disable=broad-except
        row['error'] = f'{type(e).__name__}: {e}'[:1000]
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def layer_timings(tiny: bool, T: int) -> list[dict]:
  """NSA's branches and whole layer, MoBA's and DSA's layers, forward+backward, at T tokens."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from sparse_lm import attention, ladder  # pylint: disable=g-import-not-at-top
  dt = _dtype()
  rows = []
  for variant in ('dense', 'nsa', 'moba', 'dsa'):
    if tiny:
      c = decode.bench_config(variant, layers=1, d_model=64, heads=4, kv_heads=2, head_dim=16, papers=False)
    elif variant == 'dense':
      c = ladder.dense_config('100m')
    else:  # the 100m rung's variant, as its config ships
      c = ladder.nsa_config('100m') if variant == 'nsa' else ladder.variant_config('100m', variant)
    c.model.kernel, c.model.dtype = 'pallas', jnp.dtype(dt).name
    layer = attention.REGISTRY[variant](c.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = _normal(11, (1, T, c.model.d_model), dt)
    pos = jnp.arange(T)[None]

    def loss(params, x, graphdef=graphdef, pos=pos):
      return jnp.sum(nnx.merge(graphdef, params)(x, pos)[0].astype(jnp.float32))
    row = {'case': 'layer', 'variant': variant, 'T': T}
    try:
      row['fwd_ms'] = 1e3 * _median_s(jax.jit(lambda p, x, g=graphdef, pos=pos: nnx.merge(g, p)(x, pos)[0]),
                                      params, x)
      if not tiny or variant == 'dense':  # --tiny: the backward's code path once (interpreting is slow)
        row['fwd_bwd_ms'] = 1e3 * _median_s(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x)
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = f'{type(e).__name__}: {e}'[:1000]
    rows.append(row)
    print(json.dumps(row), flush=True)
    if variant == 'nsa':
      rows += _nsa_branches(c, T)
  return rows


def _nsa_branches(c, T: int) -> list[dict]:
  n, m = c.model.nsa, c.model
  dt = _dtype()
  H, K, D = m.num_heads, m.num_kv_heads, m.head_dim
  C = (T - n.cmp_block) // n.cmp_stride + 1
  q, k, v = _normal(1, (1, T, H, D), dt), _normal(2, (1, T, K, D), dt), _normal(3, (1, T, K, D), dt)
  ck, cv = _normal(4, (1, C, K, D), dt), _normal(5, (1, C, K, D), dt)
  rules = dict(cmp_block=n.cmp_block, cmp_stride=n.cmp_stride)
  lse = jax.jit(lambda q, ck, cv: compressed_attention(q, ck, cv, **rules)[1])(q, ck, cv)
  select = functools.partial(block_selection, sel_block=n.sel_block, num_selected=n.num_selected, **rules)
  idx = jax.jit(select)(q, ck, lse)
  branches = {
      'compressed_attention': (lambda q, ck, cv: compressed_attention(q, ck, cv, **rules)[0], (q, ck, cv)),
      'block_selection': (select, (q, ck, lse)),
      'selected_attention': (lambda q, k, v, idx: selected_attention(q, k, v, idx, block_size=n.sel_block),
                             (q, k, v, idx)),
      'window': (lambda q, k, v: flash_attention(q, k, v, window=n.window), (q, k, v)),
  }
  rows = []
  for name, (fn, args) in branches.items():
    row = {'case': 'nsa_branch', 'branch': name, 'T': T}
    try:
      row['fwd_ms'] = 1e3 * _median_s(jax.jit(fn), *args)
    except Exception as e:  # pylint: disable=broad-except
      row['error'] = f'{type(e).__name__}: {e}'[:1000]
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def decode_timings(tiny: bool) -> list[dict]:
  rows = []
  length = 256 if tiny else 65536
  for variant in ('dense', 'nsa', 'moba', 'dsa'):
    c = (decode.bench_config(variant, layers=1, d_model=64, heads=4, kv_heads=2, head_dim=16, papers=False)
         if tiny else decode.bench_config(variant))
    c.model.dtype = jnp.dtype(_dtype()).name
    try:
      row = {'case': 'decode', **decode.measure(c, 1, length, repeats=_REPEATS.value)}
    except Exception as e:  # pylint: disable=broad-except
      row = {'case': 'decode', 'variant': variant, 'error': f'{type(e).__name__}: {e}'[:1000]}
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def train_step_timing(tiny: bool) -> dict:
  from sparse_lm import flops, ladder, optim, trainer  # pylint: disable=g-import-not-at-top
  c = ladder.dense_config('100k' if tiny else '100m')
  c.model.vocab_size = 50304 if not tiny else 259
  c.train.batch_size = 2 if tiny else 16
  c.data.seq_len = 64 if tiny else 2048
  if tiny:
    c.model.kernel = 'pallas'
  row = {'case': 'train_step', 'config': 'dense_100k' if tiny else 'dense_100m',
         'batch': c.train.batch_size, 'seq_len': c.data.seq_len}
  try:
    tx, schedule = optim.make_optimizer(c.train)
    graphdef, _, _ = trainer.split_model(c.model)
    state = jax.jit(trainer.state_init_fn(c, tx))(jax.random.key(0))
    step = jax.jit(trainer.make_train_step(graphdef, tx, schedule, 1), donate_argnums=0)
    B, T = c.train.batch_size, c.data.seq_len
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, c.model.vocab_size)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}
    times = []
    for i in range(2 + _REPEATS.value):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics['loss'])
      if i >= 2:
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    per_token = flops.flops_per_token(c)['flops_per_token']['total']
    row.update(step_s=seconds, tokens_per_s=B * T / seconds,
               mfu=B * T * per_token / seconds / (_PEAK.value * 1e12), loss=float(metrics['loss']))
  except Exception as e:  # pylint: disable=broad-except
    row['error'] = f'{type(e).__name__}: {e}'[:1000]
    row['trace'] = traceback.format_exc()[-2000:]
  print(json.dumps(row), flush=True)
  return row


def main(argv) -> None:
  del argv
  tiny = _TINY.value
  start = time.perf_counter()
  report = {'date': time.strftime('%Y-%m-%d %H:%M'), 'backend': jax.default_backend(),
            'devices': [str(d.device_kind) for d in jax.devices()], 'jax': jax.__version__,
            'host': platform.node(), 'tiny': tiny, 'sections': {}, 'skipped': []}
  lengths = [64] if tiny else [int(x) for x in _LENGTHS.value]
  sections = [('correctness', lambda: correctness(tiny)),
              ('attention', lambda: attention_timings(tiny, lengths)),
              ('layers', lambda: layer_timings(tiny, lengths[-1])),
              ('decode', lambda: decode_timings(tiny)),
              ('train_step', lambda: train_step_timing(tiny))]
  for name, run in sections:
    elapsed = time.perf_counter() - start
    if elapsed > _BUDGET.value:
      report['skipped'].append(f'{name}: started past --budget_s ({elapsed:.0f} s)')
      continue
    report['sections'][name] = run()
    report[f'{name}_seconds'] = round(time.perf_counter() - start - elapsed, 1)
    pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=1))  # after each section
  report['seconds'] = round(time.perf_counter() - start, 1)
  report['all_correct'] = all(row.get('passed') for row in report['sections'].get('correctness', []))
  pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=1))
  print(json.dumps({'out': _OUT.value, 'seconds': report['seconds'], 'all_correct': report['all_correct'],
                    'skipped': report['skipped']}))


if __name__ == '__main__':
  app.run(main)
