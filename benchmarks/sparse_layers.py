"""Forward+backward time and memory of sparse attention layers against dense as the sequence grows.

    python benchmarks/sparse_layers.py [--lengths=1024,2048,4096,8192] [--kernel=xla] [--repeats=3]
        [--variants=dense,nsa,mosa,mosa_causal,routing,routing_causal,moba,dsa]

One attention layer, batch 1, `--heads` dense heads of 64 (d_model = 64 x heads, 1 kv head). The
sparse layers are the dense one turned into each variant by the ladder's recipes at accelerator scale
(`sparse_lm/ladder.py`): NSA with the paper's blocks; MoSA keeps 1 dense head and spends the others'
FLOPs on MoSA heads at sparsity 64 (the isoFLOP rule); routing keeps half the heads local (window 256)
and routes the other half over round(sqrt(T)) clusters; MoBA blocks of 512, top-3; DSA top-2,048
tokens with an indexer of 8 heads of 64. The layer is called as the train step calls it
(`update_state=True`: DSA's indexer loss and recall, MoSA's thresholds, routing's centroids) and its
`AuxLoss` sows join the loss. Time: `jax.grad` of a scalar of the layer's output, median of
`--repeats` runs after a compiling one. Memory: the temporaries of XLA's buffer assignment for that
jitted gradient (`compiled.memory_analysis().temp_size_in_bytes`), the activation memory the program
needs beyond its arguments and outputs (the parameters and their gradients, given apart as the
parameter count: MoSA's isoFLOP rule buys many heads, each with its own projections); on a CPU it is
what the program allocates, not a device high-water mark.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from sparse_lm import attention, ladder
from sparse_lm.config import base_config
from sparse_lm.layers import AuxLoss

_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192'], 'Sequence lengths.')
_KERNEL = flags.DEFINE_string('kernel', 'xla', 'model.kernel: xla or pallas.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per point.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Dense query heads of 64.')
_VARIANTS = flags.DEFINE_list('variants', ['dense', 'nsa', 'mosa', 'mosa_causal', 'routing', 'routing_causal',
                                           'moba', 'dsa'], 'Layers to measure.')


def layer_cfg(name: str, T: int):
  c = base_config()
  c.data.seq_len = T
  c.model.update(kernel=_KERNEL.value, d_model=64 * _HEADS.value, num_heads=_HEADS.value,
                 num_kv_heads=1, head_dim=64, num_layers=1)
  # Only the attention layer runs: an MLP wide enough for the recipes that narrow it (NSA, DSA).
  c.model.mlp_dim = 2**20
  ladder.VARIANTS[name](c, small=False)
  return c.model


def measure(name: str, T: int) -> tuple[float, float, int, str]:
  """(median seconds, temporary MiB, parameters, shape note) of one layer's forward+backward at length T."""
  cfg = layer_cfg(name, T)
  layer = attention.REGISTRY[name](cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  # Plain arrays, so the Variables are made inside the trace that updates them.
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  x_BTD = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model))
  pos_BT = jnp.arange(T)[None]

  def grad(params, rest, x_BTD):
    def loss(params, rest):
      layer = nnx.merge(graphdef, params, rest)
      (y_BTD, _), aux, _ = nnx.capture(layer, AuxLoss, nnx.Intermediate)(x_BTD, pos_BT, update_state=True)
      return jnp.mean(y_BTD ** 2) + sum(jax.tree.leaves(aux))
    return jax.grad(loss)(params, rest)
  compiled = jax.jit(grad).lower(params, rest, x_BTD).compile()
  memory = compiled.memory_analysis()
  mib = memory.temp_size_in_bytes / 2**20 if memory else float('nan')
  num_params = sum(x.size for x in jax.tree.leaves(params))
  jax.block_until_ready(compiled(params, rest, x_BTD))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, rest, x_BTD))
    times.append(time.perf_counter() - start)
  note = {'mosa': f'{cfg.mosa.num_heads} heads k={T // cfg.mosa.sparsity}',
          'routing': f'{cfg.routing.num_heads} heads C={cfg.routing.num_clusters}',
          'moba': f'blocks of {cfg.moba.block_size}, top-{cfg.moba.top_k}',
          'dsa': f'top-{cfg.dsa.top_k}, indexer {cfg.dsa.index_heads}x{cfg.dsa.index_head_dim}',
          'nsa': f'l={cfg.nsa.cmp_block} d={cfg.nsa.cmp_stride} l\'={cfg.nsa.sel_block} '
                 f'n={cfg.nsa.num_selected} w={cfg.nsa.window}'}
  shape = note.get(name.removesuffix('_causal'), f'{cfg.num_heads} heads')
  return statistics.median(times), mib, num_params, shape


def main(argv) -> None:
  del argv
  print(f'{"T":>6} {"layer":<15} {"fwd+bwd s":>10} {"temp MiB":>9} {"x dense s":>10} {"x dense MiB":>12} '
        f'{"params":>9}  shape', flush=True)
  for T in (int(t) for t in _LENGTHS.value):
    base = None
    for name in _VARIANTS.value:
      seconds, mib, num_params, note = measure(name, T)
      base = base or (seconds, mib)
      print(f'{T:>6} {name:<15} {seconds:>10.3f} {mib:>9.1f} {seconds / base[0]:>10.2f} '
            f'{mib / base[1]:>12.2f} {num_params:>9,}  {note}', flush=True)


if __name__ == '__main__':
  app.run(main)
