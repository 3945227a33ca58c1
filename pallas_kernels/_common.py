"""What every kernel in this package decides the same way: which body runs, and whether it is interpreted.

The choice follows the platform a program is LOWERED for, not the host that traces it: a train step
traced on a CPU host and compiled for a GPU or TPU (`python -m sparse_lm.compile`) contains the real
kernels. With `backend=None` and `interpret=None` a call becomes a `jax.lax.platform_dependent` over

- `cpu`: the GPU (Triton) body in interpret mode (the TPU body when `backend='tpu'`);
- `cuda` / `rocm`: the GPU body, compiled;
- `tpu`: the TPU (Mosaic) body, compiled;

and only the branch of the platform being lowered is lowered. `backend=` and `interpret=` stay explicit
overrides: `interpret=True` interprets on every platform (the GPU body unless `backend='tpu'`),
`interpret=False` compiles on every platform (so a test can lower for `cuda` from a CPU host), and a
given backend fixes the body. A body that cannot take the call's shapes (the Triton body needs powers
of two, say) is not an error until a program is lowered for its platform; then the lowering fails with
the body's own one-line reason.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

BACKENDS = ('gpu', 'tpu')
IMPLEMENTATIONS = ('pallas', 'xla')
_PLATFORM_BODY = {'cpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}


def check_implementation(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is not one of {IMPLEMENTATIONS}')


def check_backend(backend: str | None) -> None:
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS}')


def interpret_param(interpret: bool | str, backend: str):
  """The `interpret=` argument of `pl.pallas_call`. TPU bodies interpret under `InterpretParams`, which
  raises on out-of-range block indices that plain interpret mode silently clamps; `UNCHECKED` asks for
  plain interpret mode, whose program has no side effects and so can sit in a platform switch."""
  if not interpret:
    return False
  return pltpu.InterpretParams() if backend == 'tpu' and interpret is True else True


UNCHECKED = 'unchecked'


def _varying(*operands) -> frozenset:
  return frozenset().union(*(jax.typeof(x).mat.varying for x in operands))


def in_shard_map(*operands) -> bool:
  """Whether the operands vary over manual mesh axes (they are shard_map values that differ by device).
  JAX's Pallas interpreter cannot run there (its dynamic slices mix varying and invariant values), so
  an interpreted kernel's caller runs the XLA reference instead; compiled kernels run as they are."""
  return bool(_varying(*operands))


def vary_alike(*operands) -> tuple:
  """Inside `shard_map`, every operand marked as varying over the manual mesh axes any of them varies
  over. A kernel's custom_vjp must return each cotangent with its input's type; the marking's transpose
  (a psum over the added axes, outside the kernel) then sums, say, a weight gradient over the
  data-parallel devices, as autodiff of plain JAX ops would. Outside shard_map it changes nothing."""
  union = _varying(*operands)
  return tuple(jax.lax.pcast(x, tuple(sorted(union - _varying(x))), to='varying') for x in operands)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """A kernel output's type: inside `shard_map` it varies over every manual mesh axis an operand varies
  over (shard_map checks that a kernel says so); elsewhere there are no manual axes."""
  mat = jax.typeof(operands[0]).mat
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=type(mat)(varying=_varying(*operands)))


def choices(backend: str | None, interpret: bool | None) -> dict[str, tuple[str, bool | str]]:
  """(body, interpreted) for each platform a program may be lowered for.

  `interpret=True` runs one body everywhere (`backend`, else the GPU body, which interprets fastest);
  `interpret=False` compiles everywhere. The TPU body interpreted on CPU beside compiled bodies on the
  other platforms runs `UNCHECKED`: `InterpretParams`' callbacks are effects, and JAX cannot lower
  effects inside one platform's branch.
  """
  check_backend(backend)
  if interpret:
    return dict.fromkeys(_PLATFORM_BODY, (backend or 'gpu', True))
  cpu_mode = False if interpret is not None else UNCHECKED if backend == 'tpu' else True
  return {platform: (backend or body, cpu_mode if platform == 'cpu' else False)
          for platform, body in _PLATFORM_BODY.items()}


def dispatch(build: Callable[[str, bool], Callable], args: tuple, out, *, backend: str | None,
             interpret: bool | None):
  """Runs `build(body, interpreted)(*args)` with the body and mode of the platform being lowered for.

  `build` checks the static configuration (raising ValueError for what a body cannot take) and returns
  the function to trace; `out` is a ShapeDtypeStruct pytree of its result. When the choice does not
  depend on the platform, `build` is called once and its errors surface at once.
  """
  per_platform = choices(backend, interpret)
  if len(set(per_platform.values())) == 1:
    return build(*per_platform['cpu'])(*args)
  built = {}
  for choice in set(per_platform.values()):
    try:
      built[choice] = build(*choice)
    except ValueError as e:  # refused only if a program is lowered for a platform that needs this body
      built[choice] = _refusal(str(e), out)
  return jax.lax.platform_dependent(*args, **{p: built[c] for p, c in per_platform.items()})


# ----------------------------------------------------------------------------- refusal at lowering

_refused_p = Primitive('pallas_kernels_refused')
_refused_p.multiple_results = True
_refused_p.def_abstract_eval(lambda *args, reason, out: out)


def _refuse(*args, reason, out):  # lowering for the platform, or running eagerly (lowered for the host)
  del args, out
  raise ValueError(reason)


def _refused_jvp(primals, tangents, *, reason, out):
  """The refusal reaches the tangents (and, transposed, the gradients) too: a zero tangent would let a
  train step drop the forward value, so the refused branch would vanish from the program and its
  gradients silently come out zero instead of failing."""
  linear = [ad.instantiate_zeros(t) for p, t in zip(primals, tangents, strict=True)
            if jnp.issubdtype(jax.typeof(p).dtype, jnp.inexact)]
  tangent_avals = tuple(aval.to_tangent_aval() for aval in out)
  return (_refused_p.bind(*primals, reason=reason, out=out),
          _refused_p.bind(*linear, reason=reason, out=tangent_avals))


def _refused_transpose(cts, *args, reason, out):
  del out
  linear = [a for a in args if ad.is_undefined_primal(a)]
  grads = iter(_refused_p.bind(*map(ad.instantiate_zeros, cts), reason=reason,
                               out=tuple(a.aval for a in linear)))
  return [next(grads) if ad.is_undefined_primal(a) else None for a in args]


def _refused_batch(args, dims, *, reason, out):
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not batching.not_mapped)
  batched = tuple(aval.update(shape=(size, *aval.shape)) for aval in out)
  args = [batching.moveaxis(a, d, 0) if d is not batching.not_mapped else a
          for a, d in zip(args, dims, strict=True)]
  return _refused_p.bind(*args, reason=reason, out=batched), [0] * len(out)


_refused_p.def_impl(_refuse)
mlir.register_lowering(_refused_p, lambda ctx, *args, **params: _refuse(*args, **params))
ad.primitive_jvps[_refused_p] = _refused_jvp
ad.primitive_transposes[_refused_p] = _refused_transpose
batching.primitive_batchers[_refused_p] = _refused_batch


def _refusal(reason: str, out) -> Callable:
  """A function with the shapes of `out` whose lowering raises `reason` (and only its lowering)."""
  leaves, tree = jax.tree.flatten(out)
  avals = tuple(jax.core.ShapedArray(leaf.shape, leaf.dtype) for leaf in leaves)

  def refused(*args):  # inside shard_map, typed like the other platforms' branches
    outs = _refused_p.bind(*args, reason=reason, out=avals)
    return jax.tree.unflatten(tree, [jax.lax.pcast(o, tuple(sorted(_varying(*args))), to='varying')
                                     for o in outs])
  return refused
