"""Forward+backward time of one NSA layer against one dense layer as the sequence grows.

    python benchmarks/nsa_layer.py [--lengths=2048,4096,8192,16384] [--kernel=xla] [--repeats=3]

One attention layer (`--heads` query heads sharing 1 kv head of 64, batch 1), NSA at the paper's
l=32, d=16, l'=64, n=16, w=512; the time of `jax.grad` of a scalar of the layer's output, median of
`--repeats` runs after one compiling run.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from sparse_lm import attention
from sparse_lm.config import base_config

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192', '16384'], 'Sequence lengths.')
_KERNEL = flags.DEFINE_string('kernel', 'xla', 'model.kernel: xla or pallas.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per point.')
_HEADS = flags.DEFINE_integer('heads', 2, 'Query heads (dense attention at 16K needs ~4 GB per head).')


def layer_cfg(name: str):
  m = base_config().model
  m.update(attention=name, kernel=_KERNEL.value, d_model=64 * _HEADS.value, num_heads=_HEADS.value,
           num_kv_heads=1, head_dim=64)
  return m


def time_grad(name: str, T: int) -> float:
  layer = attention.REGISTRY[name](layer_cfg(name), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer, nnx.Param)
  x_BTD = jax.random.normal(jax.random.key(1), (1, T, 64 * _HEADS.value))
  pos_BT = jnp.arange(T)[None]

  @jax.jit
  def grad(params, x_BTD):
    def loss(params):
      y_BTD, _ = nnx.merge(graphdef, params)(x_BTD, pos_BT)
      return jnp.mean(y_BTD ** 2)
    return jax.grad(loss)(params)
  jax.block_until_ready(grad(params, x_BTD))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(grad(params, x_BTD))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv) -> None:
  del argv
  lengths = [int(t) for t in _LENGTHS.value]
  rows = {'dense': [], 'nsa': []}
  print(f'{"T":>7} {"dense s":>9} {"nsa s":>9} {"dense/nsa":>9}', flush=True)
  for T in lengths:
    for name, times in rows.items():
      times.append(time_grad(name, T))
    dense, nsa = rows['dense'][-1], rows['nsa'][-1]
    print(f'{T:>7} {dense:>9.3f} {nsa:>9.3f} {dense / nsa:>9.2f}', flush=True)
  if 4096 in lengths and 16384 in lengths:
    a, b = lengths.index(4096), lengths.index(16384)
    for name, times in rows.items():
      print(f'{name}: time(16K) / time(4K) = {times[b] / times[a]:.2f}')


if __name__ == '__main__':
  app.run(main)
