"""Forward+backward time of one NSA layer against one dense layer as the sequence grows.

    python benchmarks/nsa_layer.py [--lengths=2048,4096,8192,16384,32768] [--kernel=xla] [--repeats=3]

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

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192', '16384', '32768'], 'Sequence lengths.')
_KERNEL = flags.DEFINE_string('kernel', 'xla', 'model.kernel: xla or pallas.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per point.')
_DENSE_MAX = flags.DEFINE_integer('dense_max', 16384, 'Longest sequence the dense layer is timed at (at 32K '
                                  'its [T, T] scores and their gradient need more than 24 GiB).')
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
  rows = {'dense': {}, 'nsa': {}}
  print(f'{"T":>7} {"dense s":>9} {"nsa s":>9} {"dense/nsa":>9}', flush=True)
  for T in lengths:
    rows['nsa'][T] = time_grad('nsa', T)
    if T <= _DENSE_MAX.value:
      rows['dense'][T] = time_grad('dense', T)
    dense, nsa = rows['dense'].get(T, float('nan')), rows['nsa'][T]
    print(f'{T:>7} {dense:>9.3f} {nsa:>9.3f} {dense / nsa:>9.2f}', flush=True)
  for name, times in rows.items():  # growth per 4x tokens, where both points were run
    for T in times:
      if 4 * T in times:
        print(f'{name}: time({4 * T // 1024}K) / time({T // 1024}K) = {times[4 * T] / times[T]:.2f}')

if __name__ == '__main__':
  app.run(main)
