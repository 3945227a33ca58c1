"""What the kernels' XLA references share: the mask value and running in chunks of queries."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# The score of a masked key, in every kernel, reference and XLA path. Finite: a query row can meet a block
# where all its keys are masked (before its window starts, or as a padded query), and an online softmax
# would compute exp(-inf - -inf) = NaN there; a fully masked row gives a uniform, then ignored, softmax.
MASK_VALUE = -1e30

# Queries per chunk of the XLA paths: 256 x (keys) float32 scores per head at a time.
XLA_CHUNK = 256


def map_query_chunks(fn: Callable, per_query: tuple, fills: tuple, *, chunk: int):
  """`fn(*per_query)` computed `chunk` queries at a time, so an XLA reference's `[queries, keys]`
  intermediates exist for one chunk only, in the forward pass and (each chunk rematerialised with
  `jax.checkpoint`) in the backward pass too. `per_query` arrays have queries on axis 1 and are padded
  with their `fills` to whole chunks; `fn` returns a pytree of arrays with queries on axis 1."""
  B, T = per_query[0].shape[:2]
  if T <= chunk:
    return fn(*per_query)
  N = -(-T // chunk)

  def chunks(x, fill):
    x = jnp.pad(x, ((0, 0), (0, N * chunk - T)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(B, N, chunk, *x.shape[2:]), 1, 0)

  out = jax.lax.map(jax.checkpoint(lambda args: fn(*args), prevent_cse=False),
                    tuple(map(chunks, per_query, fills)))
  return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(B, N * chunk, *y.shape[3:])[:, :T], out)
