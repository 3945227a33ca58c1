"""Forward+backward time and memory of MoSA and routing layers against dense as the sequence grows.

    python benchmarks/sparse_layers.py [--lengths=1024,2048,4096,8192] [--kernel=xla] [--repeats=3]

One attention layer, batch 1, `--heads` dense heads of 64 (d_model = 64 x heads, 1 kv head). The
sparse layers are the dense one turned into each variant by the ladder's recipes at accelerator scale
(`sparse_lm/ladder.py`): MoSA keeps 1 dense head and spends the others' FLOPs on MoSA heads at
sparsity 64 (the isoFLOP rule); routing keeps half the heads local (window 256) and routes the other
half over round(sqrt(T)) clusters. Time: `jax.grad` of a scalar of the layer's output, median of
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

_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192'], 'Sequence lengths.')
_KERNEL = flags.DEFINE_string('kernel', 'xla', 'model.kernel: xla or pallas.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per point.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Dense query heads of 64.')
_VARIANTS = flags.DEFINE_list('variants', ['dense', 'mosa', 'mosa_causal', 'routing', 'routing_causal'],
                              'Layers to measure.')


def layer_cfg(name: str, T: int):
  c = base_config()
  c.data.seq_len = T
  c.model.update(kernel=_KERNEL.value, d_model=64 * _HEADS.value, num_heads=_HEADS.value,
                 num_kv_heads=1, head_dim=64)
  ladder.VARIANTS[name](c, small=False)
  return c.model


def measure(name: str, T: int) -> tuple[float, float, int, str]:
  """(median seconds, temporary MiB, parameters, shape note) of one layer's forward+backward at length T."""
  cfg = layer_cfg(name, T)
  layer = attention.REGISTRY[name](cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x_BTD = jax.random.normal(jax.random.key(1), (1, T, cfg.d_model))
  pos_BT = jnp.arange(T)[None]

  def grad(params, rest, x_BTD):
    def loss(params):
      y_BTD, _ = nnx.merge(graphdef, params, rest)(x_BTD, pos_BT)
      return jnp.mean(y_BTD ** 2)
    return jax.grad(loss)(params)
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
          'routing': f'{cfg.routing.num_heads} heads C={cfg.routing.num_clusters}'}
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
