"""Small building blocks shared by every model variant: parameters with logical axes and their init scale,
the auxiliary-loss channel, RMSNorm, RoPE."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *, stddev: float,
          dtype: str = 'float32') -> nnx.Param:
  """A normal-initialised parameter tagged with logical axis names (see sharding.RULES)."""
  value = stddev * jax.random.normal(rngs.params(), tuple(shape), jnp.dtype(dtype))
  return nnx.Param(value, axes=tuple(axes))


def output_stddev(fan_in: int, num_layers: int) -> float:
  """Init scale of a projection back onto the residual stream: small, so each of the 2 x num_layers
  residual branches adds little at init (GPT-2's scheme)."""
  return fan_in**-0.5 / (2 * num_layers) ** 0.5


class AuxLoss(nnx.Intermediate):
  """A term a layer adds to the training loss, sown as `self.sow(AuxLoss, name, value)`: the trainer
  captures this type apart from plain `nnx.Intermediate` sows (metrics) and sums it into `aux_loss`."""


class RMSNorm(nnx.Module):
  """RMSNorm (Zhang & Sennrich 2019), computed in float32 whatever the activation dtype."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str = 'float32'):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), axes=('norm',))
    self.eps = eps

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x32_BTD = x_BTD.astype(jnp.float32)
    ms_BT1 = jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True)
    scale_11D = self.scale[...].astype(jnp.float32)[None, None, :]
    y_BTD = x32_BTD * jax.lax.rsqrt(ms_BT1 + self.eps) * scale_11D
    return y_BTD.astype(x_BTD.dtype)


def rope(x_BTHD: jax.Array, pos_BT: jax.Array, theta: float, rotated: int | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) on the two halves of the head dimension; `rotated`:
  only the first this many features (split in halves), the rest pass unrotated (partial RoPE)."""
  if rotated is not None and rotated < x_BTHD.shape[-1]:
    return jnp.concatenate([rope(x_BTHD[..., :rotated], pos_BT, theta), x_BTHD[..., rotated:]], axis=-1)
  half = x_BTHD.shape[-1] // 2
  freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTF = pos_BT.astype(jnp.float32)[:, :, None] * freq_F[None, None, :]
  sin_BT1F, cos_BT1F = jnp.sin(angle_BTF)[:, :, None, :], jnp.cos(angle_BTF)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BT1F - x2 * sin_BT1F, x2 * cos_BT1F + x1 * sin_BT1F], axis=-1)
  return out.astype(x_BTHD.dtype)
