"""The SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparse_lm import sharding
from sparse_lm.layers import output_stddev, param
from sparse_lm.mlp import base


class Mlp(base.Mlp):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.param_dtype
    self.w_gate = param(rngs, (d, f), ('embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    self.w_up = param(rngs, (d, f), ('embed', 'mlp'), stddev=d**-0.5, dtype=pd)
    self.w_down = param(rngs, (f, d), ('mlp', 'embed'), stddev=output_stddev(f, cfg.num_layers), dtype=pd)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x_BTD: jax.Array, *, update_state: bool = False) -> jax.Array:
    del update_state  # no state besides the parameters
    x_BTD = x_BTD.astype(self.dtype)
    gate_BTF = jnp.einsum('btd,df->btf', x_BTD, self.w_gate[...].astype(self.dtype))
    up_BTF = jnp.einsum('btd,df->btf', x_BTD, self.w_up[...].astype(self.dtype))
    h_BTF = sharding.constrain(jax.nn.silu(gate_BTF) * up_BTF, ('batch', 'length', 'mlp'))
    y_BTD = jnp.einsum('btf,fd->btd', h_BTF, self.w_down[...].astype(self.dtype))
    return sharding.constrain(y_BTD, ('batch', 'length', 'act_embed'))
