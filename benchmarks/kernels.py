"""Times each Pallas kernel against its XLA reference (and attention against
`jax.nn.dot_product_attention`), forward and forward+backward, and prints a table.

    python benchmarks/kernels.py --kernel=flash --lengths=1024,2048 [--impls=xla,dpa_xla,pallas]
    python benchmarks/kernels.py --kernel=selected --lengths=8192,16384,32768,65536    # on a GPU
    python benchmarks/kernels.py --kernel=gmm --lengths=8192,32768 --peak_tflops=989

Attention shapes: batch 1, 64 query heads sharing 4 kv heads of 128 (NSA's setting, Sec. 4.1), bfloat16
on accelerators and float32 on CPU. `selected` uses NSA's configuration (blocks of 64, 16 selected per
token, the first and two local blocks forced, the rest random) and also times dense causal flash
attention, whose time divided by the selected kernel's is the speedup. TFLOP/s counts only the FLOPs the
pattern needs (4 * D per visible query-key pair forward, 2.5 times that for the backward). On CPU the
Pallas kernels run in interpret mode, which measures correctness plumbing, not speed.
"""


import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from timing import device_dtype, median_seconds  # this folder, which a script run puts first on sys.path

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.selected_attention import selected_attention

_KERNEL = flags.DEFINE_enum('kernel', 'flash', ['flash', 'selected', 'gmm'], 'Which kernel.')
_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048'], 'Sequence lengths (tokens for gmm).')
_IMPLS = flags.DEFINE_list('impls', None, 'Implementations to time (default: all for the backend).')
_HEADS = flags.DEFINE_integer('heads', 64, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 128, 'Head dimension.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per point (median reported).')
_PEAK = flags.DEFINE_float('peak_tflops', 0.0, "The device's bf16 peak, to print fractions of it.")


def _median_seconds(fn, *args) -> float:
  return median_seconds(fn, *args, repeats=_REPEATS.value)


def _timed(forward, args, flops_fwd: float) -> dict[str, float]:
  """Forward and forward+backward times of `forward(*args)`, and their TFLOP/s."""
  def loss(*a):
    return jnp.sum(forward(*a).astype(jnp.float32))
  floating = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
  fwd = _median_seconds(jax.jit(forward), *args)
  bwd = _median_seconds(jax.jit(jax.grad(loss, argnums=floating)), *args)
  return {'fwd_ms': fwd * 1e3, 'fwdbwd_ms': bwd * 1e3, 'fwd_tflops': flops_fwd / fwd / 1e12,
          'fwdbwd_tflops': 3.5 * flops_fwd / bwd / 1e12}


def _dtype():
  return device_dtype()


def _qkv(T: int):
  keys = jax.random.split(jax.random.key(0), 3)
  H, K, D = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  return (jax.random.normal(keys[0], (1, T, H, D), _dtype()),
          jax.random.normal(keys[1], (1, T, K, D), _dtype()),
          jax.random.normal(keys[2], (1, T, K, D), _dtype()))


def _attention_impls():
  impls = {
      'pallas': lambda q, k, v: flash_attention(q, k, v, causal=True),
      'xla': lambda q, k, v: flash_attention(q, k, v, causal=True, implementation='xla'),
      'dpa_xla': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation='xla'),
  }
  if jax.default_backend() == 'gpu':
    impls['dpa_cudnn'] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                      implementation='cudnn')
  return impls


def _nsa_block_indices(T: int, block: int = 64, n: int = 16) -> np.ndarray:
  """First block, current and previous blocks forced; the other slots random earlier blocks."""
  rng = np.random.default_rng(0)
  t_T = np.arange(T)
  cur_T = t_T // block
  idx_Tn = np.full((T, n), -1, np.int32)
  idx_Tn[:, 0], idx_Tn[:, 1], idx_Tn[:, 2] = 0, cur_T, np.maximum(cur_T - 1, 0)
  for t in range(0, T, block):  # a block of tokens shares its random choices, like real top-n does
    if cur_T[t] > 1:
      picks = rng.choice(np.arange(1, cur_T[t] - 1), size=min(n - 3, cur_T[t] - 2), replace=False)
      idx_Tn[t:t + block, 3:3 + len(picks)] = picks
  return np.broadcast_to(idx_Tn[None, :, None, :], (1, T, _KV_HEADS.value, n)).copy()


def _visible_pairs(idx_Tn: np.ndarray, block: int = 64) -> int:
  total = 0
  for t, row in enumerate(idx_Tn):
    for j in set(int(j) for j in row if j >= 0):
      total += max(0, min(block, t - j * block + 1))
  return total


def cases(T: int) -> dict[str, tuple]:
  """name -> (function, arguments, forward FLOPs the pattern needs)."""
  H, D = _HEADS.value, _HEAD_DIM.value
  dense_flops = 4 * D * H * T * (T + 1) / 2
  if _KERNEL.value == 'flash':
    return {name: (fn, _qkv(T), dense_flops) for name, fn in _attention_impls().items()}
  if _KERNEL.value == 'selected':
    idx_BTKn = _nsa_block_indices(T)
    flops = 4 * D * H * _visible_pairs(idx_BTKn[0, :, 0])
    q, k, v = _qkv(T)
    args = (q, k, v, jnp.asarray(idx_BTKn))

    def selected(impl):
      return lambda q, k, v, i: selected_attention(q, k, v, i, block_size=64, implementation=impl)
    return {'pallas': (selected('pallas'), args, flops), 'xla': (selected('xla'), args, flops),
            'dense_flash': (lambda q, k, v: flash_attention(q, k, v, causal=True), (q, k, v), dense_flops)}
  G, Kd, N = 8, 2048, 1408  # 8 experts of a d_model-2048 layer, fine-grained width
  lhs = jax.random.normal(jax.random.key(1), (T, Kd), _dtype())
  rhs = jax.random.normal(jax.random.key(2), (G, Kd, N), _dtype())
  sizes = jnp.asarray(np.random.default_rng(0).multinomial(T, np.ones(G) / G), jnp.int32)
  flops = 2 * T * Kd * N
  return {'pallas': (lambda a, b: grouped_matmul(a, b, sizes), (lhs, rhs), flops),
          'ragged_dot': (lambda a, b: jax.lax.ragged_dot(a, b, sizes), (lhs, rhs), flops),
          'dense_matmul': (lambda a, b: a @ b[0], (lhs, rhs), flops)}


def main(argv) -> None:
  del argv
  print(f'# {_KERNEL.value} on {jax.devices()[0].device_kind} ({jax.default_backend()})')
  print(f'{"T":>7} {"impl":>12} {"fwd ms":>10} {"fwd+bwd ms":>11} {"fwd TF/s":>9} {"f+b TF/s":>9}'
        + (f' {"f+b %peak":>9}' if _PEAK.value else ''))
  for T in (int(t) for t in _LENGTHS.value):
    for name, (fn, args, flops) in cases(T).items():
      if _IMPLS.value and name not in _IMPLS.value:
        continue
      r = _timed(fn, args, flops)
      line = (f'{T:>7} {name:>12} {r["fwd_ms"]:>10.2f} {r["fwdbwd_ms"]:>11.2f} {r["fwd_tflops"]:>9.3f} '
              f'{r["fwdbwd_tflops"]:>9.3f}')
      print(line + (f' {100 * r["fwdbwd_tflops"] / _PEAK.value:>8.1f}%' if _PEAK.value else ''))


if __name__ == '__main__':
  app.run(main)
