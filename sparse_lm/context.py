"""Context parallelism: each sequence split over the mesh's `context` axis (`mesh.context`).

Layout, balanced for causal work. With C devices on the axis, a row of T tokens is cut into 2C chunks of
c = T / (2C); device r holds chunks r and 2C - 1 - r, an early one and a late one, so every device has
the same causal work (the "zigzag" of Megatron-LM's context parallelism; Liu et al. 2023's ring attention
with the load balancing of Brandon et al. 2023, "Striped Attention", done by chunks). `zigzag(T, C)` is
that order. `trainer.forward` (the train and eval steps' pass) reorders each batch along T into it
(`reorder`), runs the model on the reordered tokens and returns the per-token losses in the batch's
order again (`restore`): positions (RoPE's, and the masks') and segment ids travel with the tokens, and
every layer but attention treats tokens independently, so nothing else changes; under the mesh,
`length` is split over `context` (`sharding.RULES`), so each device holds its two chunks.

Attention (`ring_attention`, the dense family's): keys and values pass around the ring of the C devices
(`ppermute`, which XLA overlaps with the step's compute), each device attending its queries to the
chunks it holds at each of C steps and merging the partial outputs by their log-sum-exps. On the kernel
path (`model.kernel=pallas`, no segments, no window) the zigzag makes every step's mask static: at step
0 a device's own chunks (two causal kernel calls), then from an earlier device both of its query chunks
against that device's early chunk, from a later device its late query chunk against both of that
device's chunks (unmasked calls; `lax.cond` picks which), so no masked tile is computed and every
device does the same work. Otherwise (the XLA path, segments, a window) each step runs the XLA
reference with explicit query and key positions and segment pairs.

NSA, MoBA and DSA use the helpers below instead of the ring: their choices range over the whole sequence,
so each device gathers what they choose from (`gather_sequence`: NSA's compressed blocks, 1/d of the
sequence, and its selection branch's keys and values; MoBA's keys and values, whose block means its gate
reads; DSA's index keys and its keys and values), fetches the rows just before or after its chunks
(`neighbours`: NSA's window halo, the rows a compressed block reaches into), and runs its queries at
their places in the row (`natural_rows`). All-gathers rather than a ring here: a choice can land on any
earlier chunk, so every device needs every chunk within the step anyway; what a ring would save is the
transient memory of holding them all at once (BENCHMARKS.md measures the cost).

MoSA and routing (and their causal forms) pick, per head (MoSA) or per cluster of a head (routing), a
set of slots out of the whole sequence, then attend within them. What that needs whole is the choice's
input, a few scores per token and head (MoSA's router logits, routing's centroid scores): the layer takes
them in the row's natural order (`restore`, a gather of a few scalars a token), so every device makes
the one device's choice. The slots' rows are exchanged as in Ulysses (Jacobs et al. 2023, "DeepSpeed
Ulysses"), from a split by tokens to a split by groups: each device puts the rows it holds into the slots
that chose them (zeros elsewhere) and a reduce-scatter over the groups leaves each device every slot of
its 1/C of the groups (`slot_groups`; groups padded to a multiple of C); it attends them as one device
would, with the same kernel, and an all-gather of the outputs brings every slot back to the device that
holds its token (`groups_slots`, `own_slots`; `per_share` places it all, the slots as `rows`). Per
device that holds `[B, groups, slots, width]` once in transit, as one device's layer does, and sends it
twice; the projections and attention of the slots are divided by C.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import attention_with_lse_reference, flash_attention_with_lse
from sparse_lm import sharding

AXIS = 'context'


def size() -> int:
  """Devices on the context axis of the mesh a step is traced under (1 outside one)."""
  mesh = sharding.active_mesh()
  return 1 if mesh is None or AXIS not in mesh.shape else mesh.shape[AXIS]


def zigzag(T: int, C: int) -> np.ndarray:
  """The token order under a context axis of C devices: chunk r, then chunk 2C-1-r, for r = 0..C-1."""
  if T % (2 * C):
    raise ValueError(f'a sequence of {T} tokens does not split into 2 x {C} equal chunks')
  chunks = np.arange(T).reshape(2 * C, T // (2 * C))
  return np.concatenate([np.concatenate([chunks[r], chunks[2 * C - 1 - r]]) for r in range(C)])


def reorder(batch: dict, C: int) -> dict:
  """The batch's `[B, T]` arrays in the zigzag order along T, with explicit `positions` (the slots'
  own where the batch had none) so that RoPE and the masks follow the tokens."""
  T = batch['inputs'].shape[1]
  order = zigzag(T, C)
  out = dict(batch)
  if 'positions' not in out:
    out['positions'] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), batch['inputs'].shape)
  return {k: (jnp.take(v, order, axis=1) if getattr(v, 'ndim', 0) >= 2 and v.shape[1] == T else v)
          for k, v in out.items()}


def restore(x_BT, C: int):
  """`[B, T, ...]` values of zigzag-ordered tokens back in the natural order."""
  return jnp.take(x_BT, np.argsort(zigzag(x_BT.shape[1], C)), axis=1)


def ring_attention(q_BTHD, k_BTKD, v_BTKD, pos_BT, seg_BT=None, *, window: int | None = None,
                   implementation: str = 'pallas'):
  """Causal attention of a zigzag-ordered sequence split over the context axis (module docstring):
  `[B, T, H, D]` queries, `[B, T, K, D]` keys and values, the tokens' positions `[B, T]` and segment ids
  (or None), under the step's mesh. Equal to attention over the whole sequence in natural order."""
  C = size()
  kernel_path = implementation != 'xla' and seg_BT is None and window is None

  def per_device(q, k, v, pos, *seg):
    seg = seg[0] if seg else None
    if kernel_path:
      return _zigzag_ring(q, k, v, C, implementation)
    return _general_ring(q, k, v, pos, seg, C, window)
  args = (q_BTHD, k_BTKD, v_BTKD, pos_BT) + (() if seg_BT is None else (seg_BT,))
  out = jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype)
  return sharding.attention_per_device(per_device, *args, split_length=True, out_shape=out)


# ----------------------------------------------------------------------------- inside a device's share
# Helpers for the per-device functions of variants that choose keys over the whole sequence (NSA): each
# runs under `shard_map` on its device's `[B, 2c, ...]` share (its early chunk, then its late one).


def natural_rows(C: int, c: int) -> jax.Array:
  """`[2c]`: the positions in the row (natural order) of this device's tokens."""
  r = jax.lax.axis_index(AXIS)
  return jnp.concatenate([r * c + jnp.arange(c), (2 * C - 1 - r) * c + jnp.arange(c)]).astype(jnp.int32)


def gather_chunks(x_BL, C: int) -> jax.Array:
  """Every device's share `[B, 2c, ...]` as all `2C` chunks in the row's order, `[B, 2C, c, ...]` (an
  all-gather over the context axis; its transpose, in the backward, a reduce-scatter)."""
  B, L = x_BL.shape[:2]
  g = jax.lax.all_gather(x_BL.reshape(B, 2, L // 2, *x_BL.shape[2:]), AXIS, axis=0)  # [C, B, 2, c, ...]
  # Device r's early chunk is chunk r, its late one chunk 2C - 1 - r.
  return jnp.moveaxis(jnp.concatenate([g[:, :, 0], g[::-1, :, 1]], axis=0), 0, 1)


def gather_sequence(x_BL, C: int) -> jax.Array:
  """Every device's share as the whole sequence in natural order, `[B, T, ...]`."""
  g = gather_chunks(x_BL, C)
  return g.reshape(g.shape[0], -1, *g.shape[3:])


def neighbours(x_BL, C: int, width: int, *, after: bool) -> jax.Array:
  """`[B, 2, width, ...]`: for each of this device's two chunks, the `width` rows of the sequence just
  before it (`after=False`: the window's halo) or just after it (the rows a block starting in the chunk
  reaches into), zeros past either end of the sequence. Gathers only each chunk's first or last
  `min(width, c)` rows from every device, so a halo wider than a chunk spans several chunks."""
  B, L = x_BL.shape[:2]
  c = L // 2
  m = min(width, c)
  k = -(-width // m)  # chunks a halo spans
  chunks = x_BL.reshape(B, 2, c, *x_BL.shape[2:])
  ends = chunks[:, :, :m] if after else chunks[:, :, c - m:]
  every = gather_chunks(ends.reshape(B, 2 * m, *x_BL.shape[2:]), C)  # [B, 2C, m, ...]
  pad = [(0, 0)] * every.ndim
  pad[1] = (0, k) if after else (k, 0)
  every = jnp.pad(every, pad)
  r = jax.lax.axis_index(AXIS)
  out = []
  for j in (r, 2 * C - 1 - r):  # this device's chunks, by their index in the row
    near = jax.lax.dynamic_slice_in_dim(every, j + 1 if after else j, k, axis=1)  # chunks j+1.. or ..j-1
    near = near.reshape(B, k * m, *x_BL.shape[2:])
    out.append(near[:, :width] if after else near[:, k * m - width:])
  return jnp.stack(out, axis=1)


def per_share(fn, *args, out_shape, rows: tuple = (), replicated: tuple = ()):
  """`fn` on each device's share under `shard_map`: `[B, T, ...]` arrays (and outputs, `out_shape`)
  split by rows over the batch axes and by tokens over the context axis, every other dimension whole
  (heads included: a variant whose per-device function mixes heads or has heads of its own, such as
  DSA's indexer); then `rows` arrays split by rows only (every device sees all of a row's, such as the
  slots of MoSA and routing), then `replicated` arrays whole to every device."""
  mesh = sharding.active_mesh()
  batch = sharding.logical_to_spec(('batch',), args[0].shape[:1], mesh)[0]
  P = jax.sharding.PartitionSpec

  def spec(x):
    return P(batch, AXIS, *([None] * (len(x.shape) - 2)))
  in_specs = (tuple(map(spec, args)) + tuple(P(batch, *([None] * (a.ndim - 1))) for a in rows)
              + (P(),) * len(replicated))
  return jax.shard_map(fn, in_specs=in_specs, out_specs=jax.tree.map(spec, out_shape))(*args, *rows,
                                                                                       *replicated)


# ----------------------------------------------------------------------------- slots (MoSA, routing)


def split_index(idx_BGS, T: int, C: int) -> jax.Array:
  """Natural-order token indices (T: an empty slot) as indices into the zigzag-ordered sequence."""
  where = jnp.asarray(np.argsort(zigzag(T, C)).astype(np.int32))
  return jnp.where(idx_BGS < T, where[jnp.minimum(idx_BGS, T - 1)], T)


def pad_groups(x, C: int, axis: int, value=0):
  """`x` with its group axis padded to a multiple of C (`value`: what a padded group holds)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % C)
  return jnp.pad(x, pad, constant_values=value)


def own_slots(zz_BGS, L: int) -> tuple[jax.Array, jax.Array]:
  """Inside a device's share of L tokens: which slots hold one of its tokens (`zz_BGS` from
  `split_index`), and that token's row in the share (L where not this device's, so a scatter drops it)."""
  mine_BGS = zz_BGS // L == jax.lax.axis_index(AXIS)
  return mine_BGS, jnp.where(mine_BGS, zz_BGS % L, L)


def slot_groups(x_BGSX, C: int) -> jax.Array:
  """Every device's slot rows (its own tokens' rows, zeros elsewhere) summed over the axis, each device
  keeping its 1/C of the groups: `[B, G / C, S, ...]` (a reduce-scatter; an all-gather backward)."""
  return jax.lax.psum_scatter(x_BGSX, AXIS, scatter_dimension=1, tiled=True)


def groups_slots(y_BgSX) -> jax.Array:
  """Each device's groups' slot outputs, `[B, G / C, S, ...]`, as every group's on every device."""
  return jax.lax.all_gather(y_BgSX, AXIS, axis=1, tiled=True)


def my_groups(x, C: int, axis: int) -> jax.Array:
  """This device's 1/C of the (padded) groups along `axis`, as `slot_groups` leaves them."""
  g = x.shape[axis] // C
  return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(AXIS) * g, g, axis=axis)


# ----------------------------------------------------------------------------- the ring


def _merge(o_BTHD, lse_BHT, o2_BTHD, lse2_BHT):
  """Two partial attentions over disjoint keys as one (float32 weights; -inf: no keys)."""
  lse = jnp.logaddexp(lse_BHT, lse2_BHT)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def weight(part):
    return jnp.where(jnp.isfinite(part), jnp.exp(part - safe), 0.0).transpose(0, 2, 1)[..., None]
  o = o_BTHD.astype(jnp.float32) * weight(lse_BHT) + o2_BTHD.astype(jnp.float32) * weight(lse2_BHT)
  return o, lse


def _next(x, C: int):
  """`x` from the previous device of the ring (device r receives device r-1's)."""
  return jax.lax.ppermute(x, AXIS, [(i, (i + 1) % C) for i in range(C)])


def _general_ring(q, k, v, pos, seg, C: int, window):
  """Any layout, segments and window: each step masks by the explicit positions and segments."""
  attend = functools.partial(attention_with_lse_reference, causal=True, window=window)
  o, lse = None, None
  held = (k, v, pos) if seg is None else (k, v, pos, seg)
  for step in range(C):
    kk, vv, kpos = held[:3]
    segments = None if seg is None else (seg, held[3])
    o_s, lse_s = attend(q, kk, vv, qpos_BT=pos, kpos_BS=kpos, segment_ids=segments)
    o, lse = (o_s.astype(jnp.float32), lse_s) if o is None else _merge(o, lse, o_s, lse_s)
    if step < C - 1:
      held = _next(held, C)
  return o.astype(q.dtype)


def _zigzag_ring(q, k, v, C: int, implementation: str):
  """The kernel path: the zigzag layout's static masks (module docstring), no masked tile computed."""
  c = q.shape[1] // 2
  attend = functools.partial(flash_attention_with_lse, implementation=implementation)
  r = jax.lax.axis_index(AXIS)
  # Step 0, the device's own chunks: the early queries causally on the early keys; the late queries on
  # the early keys and causally on the late ones (aligned to the end of the keys).
  o_early, lse_early = attend(q[:, :c], k[:, :c], v[:, :c], causal=True)
  o_late, lse_late = attend(q[:, c:], k, v, causal=True)
  o = jnp.concatenate([o_early, o_late], axis=1).astype(jnp.float32)
  lse = jnp.concatenate([lse_early, lse_late], axis=2)
  B, _, H, D = q.shape

  def from_earlier(kk, vv):  # every query of this device sees the earlier device's early chunk
    o_s, lse_s = attend(q, kk[:, :c], vv[:, :c], causal=False)
    return o_s.astype(jnp.float32), lse_s

  def from_later(kk, vv):  # only the late queries see the later device's chunks, both of them
    o_s, lse_s = attend(q[:, c:], kk, vv, causal=False)
    none_o = jnp.zeros((B, c, H, D), jnp.float32)
    none_lse = jnp.full((B, H, c), -jnp.inf, jnp.float32)
    return (jnp.concatenate([none_o, o_s.astype(jnp.float32)], axis=1),
            jnp.concatenate([none_lse, lse_s], axis=2))
  held = (k, v)
  for step in range(1, C):
    held = _next(held, C)
    source = (r - step) % C
    o_s, lse_s = jax.lax.cond(source < r, from_earlier, from_later, *held)
    o, lse = _merge(o, lse, o_s, lse_s)
  return o.astype(q.dtype)
