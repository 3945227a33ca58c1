"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparse_lm import sharding
from sparse_lm.layers import param


class Mlp(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.w_gate = param(rngs, (d, f), ('embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    self.w_up = param(rngs, (d, f), ('embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    out_std = f**-0.5 / (2 * cfg.num_layers) ** 0.5
    self.w_down = param(rngs, (f, d), ('mlp', 'embed'), stddev=out_std, dtype=pd)
    self.dtype = jnp.dtype(cfg.dtype)

  @staticmethod
  def check_config(cfg: ml_collections.ConfigDict) -> None:
    del cfg

  @staticmethod
  def is_causal(cfg: ml_collections.ConfigDict) -> bool:
    del cfg
    return True

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict, *, computed: bool = True) -> dict[str, float]:
    """Parameters (by name) that a token does not use once in a matmul, with how often it does (or,
    not `computed`, the share of them a token really needs: MoE's active parameters)."""
    del cfg, computed
    return {}

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    x_BTD = x_BTD.astype(self.dtype)
    gate_BTF = jnp.einsum('btd,df->btf', x_BTD, self.w_gate[...].astype(self.dtype))
    up_BTF = jnp.einsum('btd,df->btf', x_BTD, self.w_up[...].astype(self.dtype))
    h_BTF = sharding.constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'length', 'mlp'))
    y_BTD = jnp.einsum('btf,fd->btd', h_BTF, self.w_down[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed'))
