"""Every decision about how arrays are split over devices lives in this file.

Parameters and activations carry *logical* axis names (`embed`, `q_heads`, `batch`, ...). `RULES` maps
each logical name to mesh axes:

- `batch` is split over `data` and `fsdp`: both are data parallel, every device sees its own rows.
- `embed` is split over `fsdp`: parameters (and so optimizer state) are sharded ZeRO-3 style and
  gathered by XLA just before use; activations keep `embed` whole (`act_embed`), so the gather is of
  weights, not of activations.
- heads, the MLP hidden width and the vocabulary are split over `tensor` (Megatron-style): the
  attention and MLP matmuls run on a slice of heads or hidden units and end in one reduction.
- `expert` is reserved for Mixture-of-Experts weights.
- `length` (a sequence's tokens) is split over `context`: context parallelism (`sparse_lm/context.py`),
  where attention passes keys and values around the axis's devices.

A dimension whose size the mesh axes do not divide is replicated instead of split: correctness first,
and small test models (2 kv heads on a 4-way tensor axis) still run.
"""

import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_lm.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert', 'context')

RULES: dict[str, tuple[str, ...]] = {
    'batch': ('data', 'fsdp'),
    'embed': ('fsdp',),
    'vocab': ('tensor',),
    'q_heads': ('tensor',),
    'kv_heads': ('tensor',),
    'mlp': ('tensor',),
    'expert': ('expert',),
    'length': ('context',),
}


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves `-1` ("the rest") and checks that the axis sizes multiply to the device count."""
  sizes = {name: int(mesh_config.get(name, 1)) for name in MESH_AXES}  # configs before `context`: 1
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ConfigError(
        f'mesh: axis sizes {sizes} must be positive, with at most one -1 ("the rest")')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f'mesh: fixed axes {sizes} multiply to {fixed}, which does not divide the {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f'mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())} but there are '
        f'{num_devices} devices; make the product equal the device count or set one axis to -1')
  return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  shape = mesh_shape(mesh_config, jax.device_count())
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(mesh_config, shape)
  if math.prod(dcn) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  # A hybrid mesh: each granule holds a block of size shape / dcn, and granules tile the data and fsdp
  # axes, so only data-parallel gradient reductions and fsdp weight gathers cross the slow network.
  # Devices on one slice (all CPUs and GPUs report slice 0) fall back to hosts as granules.
  by_slice = len({getattr(d, 'slice_index', 0) for d in jax.devices()}) > 1
  granules = len({d.slice_index if by_slice else d.process_index for d in jax.devices()})
  if math.prod(dcn) != granules:
    raise ConfigError(f'mesh.dcn_data * mesh.dcn_fsdp = {math.prod(dcn)} must equal the number of '
                      f'{"slices" if by_slice else "processes"}, {granules}')
  devices = mesh_utils.create_hybrid_device_mesh(
      [s // d for s, d in zip(shape, dcn, strict=True)], dcn, process_is_granule=not by_slice)
  return Mesh(devices, MESH_AXES, axis_types=auto)


def dcn_shape(mesh_config: ml_collections.ConfigDict, shape: Sequence[int]) -> tuple[int, ...]:
  """How many granules each mesh axis spans: `mesh.dcn_data` and `mesh.dcn_fsdp`, 1 for the rest."""
  dcn = dict.fromkeys(MESH_AXES, 1)
  dcn.update(data=int(mesh_config.get('dcn_data', 1)), fsdp=int(mesh_config.get('dcn_fsdp', 1)))
  for name, size in zip(MESH_AXES, shape, strict=True):
    if dcn[name] < 1 or size % dcn[name]:
      raise ConfigError(f'mesh.dcn_{name}={dcn[name]} must be positive and divide mesh.{name}={size}')
  return tuple(dcn.values())


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Mesh axes for each dimension, replicating a dimension its mesh axes would not divide."""
  spec = []
  for name, size in zip(names, shape, strict=True):
    axes = tuple(a for a in RULES.get(name, ()) if mesh.shape.get(a, 1) > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
    else:
      spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh):
  """NamedShardings for a pure-dict tree shaped like `abstract_state`, from each Param's `axes`."""
  def one(variable):
    axes = variable.get_metadata().get('axes') or (None,) * variable.value.ndim
    return NamedSharding(mesh, logical_to_spec(axes, variable.value.shape, mesh))
  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over the batch axes; a row's tokens (`[B, T, ...]` arrays) over `context` where it is used."""
  rest = [None] * (ndim - 1)
  if rest and mesh.shape.get('context', 1) > 1:
    rest[0] = 'context'
  return NamedSharding(mesh, PartitionSpec(RULES['batch'], *rest))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def on_mesh(step, mesh: Mesh):
  """`step` (a jitted function) called, and so traced, with `mesh` as JAX's context mesh
  (`jax.set_mesh`): the layers read it to pin activations and to place kernels with `shard_map`, and
  jit's cache sees it, so one function traced for two meshes is two programs."""
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return step(*args, **kwargs)
  return call


def active_mesh():
  """The context mesh a step is traced under (`on_mesh`), for layers that place work explicitly with
  `shard_map`; None outside one (tests, sampling, evaluation on one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names on the context mesh; a no-op outside one."""
  mesh = active_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def attention_per_device(kernel, q_BTHD: jax.Array, k_BSKD: jax.Array, *more, split_length: bool = False,
                         out_shape=None, replicated: tuple = ()):
  """Runs an attention kernel on each device's share of a train step: rows split like the batch, heads
  over `tensor` when both the query and the kv heads divide (a device's query heads then find their kv
  heads on the same device), the sequence whole (a kernel sees every key). The kernel takes q and k
  first; arrays in and out are `[B, T, heads, ...]` like them (values, NSA's block lists) or
  `[B, heads, T]` (log-sum-exps), or `[B, T, 1, ...]` for one array all heads share. A Pallas
  kernel is a custom call that XLA's partitioner cannot split (Mosaic refuses to compile; a Triton call
  would gather its operands and run whole on every device), so it is placed by hand with `shard_map`.
  A plain call outside a context mesh. `split_length`: the sequence stays split over `context` too (the
  kernel is a context-parallel one, `sparse_lm/context.py`), whose collectives need the axis, so it gives
  its output's `out_shape` (a tree of ShapeDtypeStructs) instead of having it traced outside one.
  `replicated`: arrays every device gets whole (weights the kernel applies), passed after the rest."""
  mesh = active_mesh()
  if mesh is None:
    return kernel(q_BTHD, k_BSKD, *more, *replicated)
  batch = logical_to_spec(('batch',), q_BTHD.shape[:1], mesh)[0]
  heads = logical_to_spec(('q_heads',), q_BTHD.shape[2:3], mesh)[0]
  if logical_to_spec(('kv_heads',), k_BSKD.shape[2:3], mesh)[0] != heads:
    heads = None

  length = 'context' if split_length and mesh.shape.get('context', 1) > 1 else None

  def spec(x):
    if x.ndim == 2:  # [B, T] per-token ids (segments): rows split like the batch
      return PartitionSpec(batch, length)
    if x.ndim == 3:
      return PartitionSpec(batch, heads, length)
    # A `[B, T, 1, ...]` array (lists every kv group shares) goes whole to each device's heads.
    return PartitionSpec(batch, length, heads if x.shape[2] > 1 else None, None)
  args = (q_BTHD, k_BSKD, *more)
  out_specs = jax.tree.map(spec, out_shape or jax.eval_shape(kernel, *args, *replicated))
  in_specs = tuple(map(spec, args)) + (PartitionSpec(),) * len(replicated)
  return jax.shard_map(kernel, in_specs=in_specs, out_specs=out_specs)(*args, *replicated)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each host's rows into one global array split over the batch axes."""
  return {
      key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
      for key, value in batch.items()
  }
