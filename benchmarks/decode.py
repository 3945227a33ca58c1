"""Decoding speed on this machine: time per decoded token and the bytes each step reads, for every
variant that decodes, as the cache grows.

    python benchmarks/decode.py [--lengths=4096,16384,65536,131072] [--batches=1,16]
        [--variants=dense,sliding_window,nsa,moba,dsa,mosa_causal,routing_causal] [--out=results/decode.jsonl]
        [--plot=benchmarks/decode.png]

The model: 4 layers, d_model 256, 4 query heads and 2 kv heads of 64, float32, with the papers' block
sizes (NSA l=32, d=16, l'=64, n=16, w=512; MoBA blocks of 512, top 3; DSA top 2,048 tokens with 4 index
heads of 64; a sliding window of 512). Each case fills a cache of `length` positions (random contents:
what a step reads does not depend on them), then times decoding at its last 16 positions (NSA computes a
compressed block at one token in 16), jitted with the cache donated: the mean per token of the best of
`--repeats` runs, after a warm-up call.

`ms/step`: time per decoding step of the whole batch (per token of each sequence); `tokens/s`: the
batch's tokens per second. `read`: bytes the step reads from the cache per layer and sequence,
counted from the step's program (`cache_reads`: each cache array's readers in the jaxpr; a slice or
gather reads its output, any other reader the whole array; parameters and activations are not
counted). Not XLA's cost analysis, which
counts an in-place cache update as a read of the whole buffer. `ideal`: what the variant's rule needs
(`ideal_bytes`). The slope (time per extra cached token, between the shortest and the longest length)
is what grows with context; its ratio to dense's is the speed-up that long contexts approach.

One process on an otherwise idle machine; the JSON lines append to `--out`; a table and (with --plot) a
plot of time per token against cache length follow. Numbers go in BENCHMARKS.md.
"""

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.extend.core import Literal

from sparse_lm import model as model_lib
from sparse_lm.config import base_config

FLAGS = flags.FLAGS
DECODING = ('dense', 'sliding_window', 'nsa', 'moba', 'dsa', 'mosa_causal', 'routing_causal')


def bench_config(variant: str, *, layers: int = 4, d_model: int = 256, heads: int = 4, kv_heads: int = 2,
                 head_dim: int = 64, papers: bool = True):
  """The benchmark's model; `papers=False` keeps the variant's tiny test settings (for the test suite)."""
  c = base_config()
  m = c.model
  m.attention = variant
  m.num_layers, m.d_model, m.num_heads = layers, d_model, heads
  m.num_kv_heads, m.head_dim = kv_heads, head_dim
  m.mlp_dim, m.vocab_size = 4 * d_model, 259
  if papers:
    m.window = 512
    m.moba.block_size, m.moba.top_k = 512, 3
    m.dsa.top_k, m.dsa.index_heads, m.dsa.index_head_dim = 2048, 4, 64
  else:
    from sparse_lm import attention  # pylint: disable=g-import-not-at-top
    m.update(attention.REGISTRY[variant].tiny_config())
  return c


# ----------------------------------------------------------------------------- bytes read, counted

_VIEWS = {'reshape', 'squeeze', 'expand_dims', 'broadcast_in_dim', 'copy', 'copy_p'}
_SLICES = {'slice', 'dynamic_slice', 'gather'}
_UPDATES = {'dynamic_update_slice', 'scatter', 'scatter-add', 'scatter_add'}


def _nbytes(aval) -> int:
  return int(np.prod(aval.shape)) * aval.dtype.itemsize


def _sub_jaxprs(eqn):
  """(jaxpr, how many times it runs, how its invars map from the eqn's invars) for nested programs."""
  p = eqn.params
  name = eqn.primitive.name
  if name == 'scan':
    return [(p['jaxpr'].jaxpr, p['length'], list(range(len(eqn.invars))))]
  if name == 'while':
    nc, nb = p['cond_nconsts'], p['body_nconsts']
    body = p['body_jaxpr'].jaxpr
    # body invars: body consts, then the carry (after the cond consts in the eqn's invars)
    mapping = list(range(nc, nc + nb)) + list(range(nc + nb, len(eqn.invars)))
    return [(body, 1, mapping)]
  if name == 'cond':
    return [(b.jaxpr, 1, list(range(1, len(eqn.invars)))) for b in p['branches']]
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in p:
      inner = p[key]
      inner = getattr(inner, 'jaxpr', inner)
      return [(inner, 1, list(range(len(eqn.invars))))]
  return []


def _reads(jaxpr, tracked: set) -> tuple[int, list[bool]]:
  """Bytes read from the variables in `tracked` (and their views and updated copies) by `jaxpr`, and
  which of its outputs are such views or copies (a cache passed through)."""
  tracked = set(tracked)

  def is_tracked(v):
    return not isinstance(v, Literal) and v in tracked
  total = 0
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if is_tracked(v)]
    if not ins:
      continue
    name = eqn.primitive.name
    subs = _sub_jaxprs(eqn)
    if subs:
      costs, passed = [], [False] * len(eqn.outvars)
      for inner, times, mapping in subs:
        inner_tracked = {inner.invars[i] for i, j in enumerate(mapping)
                         if i < len(inner.invars) and is_tracked(eqn.invars[j])}
        cost, out_tracked = _reads(inner, inner_tracked)
        costs.append(times * cost)
        passed = [a or b for a, b in zip(passed, out_tracked[-len(passed):], strict=False)]
      total += max(costs) if name == 'cond' else sum(costs)
      tracked.update(v for v, p in zip(eqn.outvars, passed, strict=False) if p)
    elif name in _SLICES:
      if is_tracked(eqn.invars[0]):
        total += sum(_nbytes(v.aval) for v in eqn.outvars)
    elif name in _UPDATES:
      if is_tracked(eqn.invars[0]):
        tracked.update(eqn.outvars)  # written in place: the new buffer is the cache
      total += sum(_nbytes(v.aval) for v in eqn.invars[1:] if is_tracked(v))
    elif name in _VIEWS:
      tracked.update(eqn.outvars)
    else:
      total += sum(_nbytes(v.aval) for v in ins)
  return total, [is_tracked(v) for v in jaxpr.outvars]


def cache_reads(step, *args, cache_argnum: int) -> int:
  """Bytes that `step(*args)` reads from the leaves of `args[cache_argnum]` (counted in its jaxpr)."""
  closed = jax.make_jaxpr(step)(*args)
  leaves = [jax.tree.leaves(a) for a in args]
  first = sum(len(x) for x in leaves[:cache_argnum])
  invars = closed.jaxpr.invars[first:first + len(leaves[cache_argnum])]
  return _reads(closed.jaxpr, set(invars))[0]


def ideal_bytes(c, length: int, *, itemsize: int = 4) -> float:
  """Bytes a layer's decoding step must read per sequence by its variant's rule (values in `itemsize`
  bytes): the keys and values it attends to, and what its choice scores."""
  m = c.model
  kv_row = 2 * m.num_kv_heads * m.head_dim * itemsize  # one position's K and V
  name = m.attention
  if name == 'dense':
    return length * kv_row
  if name == 'sliding_window':
    return min(length, m.window) * kv_row
  if name == 'nsa':
    n = m.nsa
    compressed = max(0, (length - n.cmp_block) // n.cmp_stride + 1)
    return (compressed + min(length, n.num_selected * n.sel_block) + min(length, n.window)) * kv_row
  if name == 'moba':
    blocks = math.ceil(length / m.moba.block_size)
    return blocks * kv_row / 2 + min(length, m.moba.top_k * m.moba.block_size) * kv_row
  if name == 'dsa':
    index_itemsize = jnp.dtype(m.dsa.index_dtype).itemsize if 'index_dtype' in m.dsa else itemsize
    return length * m.dsa.index_head_dim * index_itemsize + min(length, m.dsa.top_k) * kv_row
  return float('nan')  # mosa_causal, routing_causal: dense heads beside slot groups; no separate rule


# ----------------------------------------------------------------------------- timing

def filled_cache(model, batch: int, length: int, seed: int = 0):
  """A cache of `length` positions, its next token at position `length - 1`; contents random (a tiled
  random block, cheap to make at any size)."""
  cache = model.init_cache(batch, length)
  key = jax.random.key(seed)

  def fill(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 2:
      return x
    key_x = jax.random.fold_in(key, x.size % 1000003)
    rows = min(x.shape[1], 1024)
    base = jax.random.normal(key_x, (x.shape[0], rows) + x.shape[2:], jnp.float32).astype(x.dtype)
    return jnp.tile(base, (1, -(-x.shape[1] // rows)) + (1,) * (x.ndim - 2))[:, :x.shape[1]]
  cache = {'end': jnp.asarray(length - 1, jnp.int32), 'layers': jax.tree.map(fill, cache['layers'])}
  return cache


def decode_step(graphdef):
  """`(state, cache, tokens_B1) -> (logits_BV, cache)`, one cached step."""
  def step(state, cache, tokens_B1):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens_B1, cache)
    return logits[:, -1], cache
  return step


def measure(c, batch: int, length: int, repeats: int = 3, steps: int = 16) -> dict:
  model = model_lib.Transformer(c.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  step = decode_step(graphdef)
  tokens = jnp.zeros((batch, 1), jnp.int32)
  cache = filled_cache(model, batch, length)
  read = cache_reads(step, state, cache, tokens, cache_argnum=1) / (batch * c.model.num_layers)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache['layers'])) / (batch * c.model.num_layers)
  jitted = jax.jit(step, donate_argnums=1)
  start = time.perf_counter()
  logits, cache = jitted(state, cache, tokens)
  logits.block_until_ready()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):  # `steps` consecutive tokens up to the last position, timed together
    cache = {**cache, 'end': jnp.asarray(length - steps, jnp.int32)}
    start = time.perf_counter()
    for _ in range(steps):
      logits, cache = jitted(state, cache, tokens)
    logits.block_until_ready()
    times.append((time.perf_counter() - start) / steps)
  del cache
  ms = 1e3 * min(times)
  return {'variant': c.model.attention, 'batch': batch, 'length': length, 'ms_per_token': ms,
          'tokens_per_s': 1e3 * batch / ms, 'read_bytes_per_layer': read,
          'ideal_bytes_per_layer': ideal_bytes(c, length), 'cache_bytes_per_layer': cache_bytes,
          'cache_bytes_per_token_per_layer': cache_bytes / length, 'first_call_s': compile_s}


def slopes(rows: list[dict]) -> dict:
  """Per (variant, batch): ms per extra 1,000 cached tokens between the shortest and longest length."""
  out = {}
  for key in {(r['variant'], r['batch']) for r in rows}:
    pts = sorted((r['length'], r['ms_per_token']) for r in rows if (r['variant'], r['batch']) == key)
    if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
      out[key] = 1e3 * (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
  return out


def table(rows: list[dict]) -> str:
  s = slopes(rows)
  lines = ['| variant | batch | cache | ms/step | tokens/s | read KiB/layer | ideal KiB/layer | '
           'cache B/token/layer |',
           '|---|---|---|---|---|---|---|---|']
  for r in sorted(rows, key=lambda r: (r['batch'], DECODING.index(r['variant']), r['length'])):
    lines.append(f"| {r['variant']} | {r['batch']} | {r['length']} | {r['ms_per_token']:.2f} | "
                 f"{r['tokens_per_s']:.0f} | {r['read_bytes_per_layer'] / 1024:.0f} | "
                 f"{r['ideal_bytes_per_layer'] / 1024:.0f} | {r['cache_bytes_per_token_per_layer']:.0f} |")
  lines += ['', '| variant | batch | ms per 1K cached tokens | dense / this |', '|---|---|---|---|']
  for (variant, batch), slope in sorted(s.items(), key=lambda kv: (kv[0][1], DECODING.index(kv[0][0]))):
    dense = s.get(('dense', batch))
    ratio = f'{dense / slope:.1f}x' if dense and slope > 0 else ''
    lines.append(f'| {variant} | {batch} | {slope:.3f} | {ratio} |')
  return '\n'.join(lines)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  batches = sorted({r['batch'] for r in rows})
  fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
  for ax, batch in zip(axes[0], batches, strict=True):
    for variant in DECODING:
      pts = sorted((r['length'], r['ms_per_token']) for r in rows
                   if r['variant'] == variant and r['batch'] == batch)
      if pts:
        ax.plot(*zip(*pts, strict=True), marker='o', label=variant)
    ax.set(xscale='log', yscale='log', xlabel='cache length (tokens)',
           ylabel='ms per step (a token per sequence)', title=f'batch {batch}')
    ax.grid(True, which='both', alpha=0.3)
  axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv) -> None:
  del argv
  rows = []
  for batch in map(int, FLAGS.batches):
    for variant in FLAGS.variants:
      for length in map(int, FLAGS.lengths):
        c = bench_config(variant)
        model = model_lib.Transformer(c.model, rngs=nnx.Rngs(0))
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            jax.eval_shape(lambda model=model, batch=batch, length=length: model.init_cache(batch, length))))
        del model
        if size > FLAGS.max_cache_gib * 2**30:
          print(json.dumps({'variant': variant, 'batch': batch, 'length': length,
                            'skipped': f'cache {size / 2**30:.1f} GiB > --max_cache_gib'}), flush=True)
          continue
        row = {**measure(c, batch, length, FLAGS.repeats), 'date': time.strftime('%Y-%m-%d'),
               'machine': f'{jax.devices()[0].platform}, {jax.device_count()} device(s)'}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if FLAGS.out:
          pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
          with open(FLAGS.out, 'a', encoding='utf-8') as f:
            f.write(json.dumps(row) + '\n')
  print(table(rows))
  if FLAGS.plot:
    plot(rows, FLAGS.plot)


if __name__ == '__main__':
  # Defined only for the command, so that benchmarks/gpu_check.py can import this module.
  _LENGTHS = flags.DEFINE_list('lengths', ['4096', '16384', '65536', '131072'], 'Cache lengths.')
  _BATCHES = flags.DEFINE_list('batches', ['1', '16'], 'Sequences decoded together.')
  _VARIANTS = flags.DEFINE_list('variants', list(DECODING), 'Variants to time.')
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per case (best kept).')
  _OUT = flags.DEFINE_string('out', 'results/decode.jsonl', 'JSON lines, appended.')
  _PLOT = flags.DEFINE_string('plot', None, 'Where to write the plot (PNG).')
  _MAX_CACHE_GIB = flags.DEFINE_float('max_cache_gib', 12.0, 'Cases whose cache exceeds this are skipped.')
  app.run(main)
