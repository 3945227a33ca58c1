"""What the benchmark scripts share: a synchronised median time, and the compute dtype of the backend."""

import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, repeats: int) -> float:
  """The median over `repeats` calls of `fn(*args)`, each waited for, after one call (compilation)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_dtype():
  """float32 on a CPU (bfloat16 products are emulated there), bfloat16 on an accelerator."""
  return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
