"""The contract of a feed-forward variant, written once: subclass `Mlp`, override what differs and add
one line to `sparse_lm.mlp.REGISTRY`. The config (its defaults), the checks, the FLOP count, the model
and the contract tests (`tests/test_variants.py`) read only these members.

A variant is built as `Variant(model_config, rngs=...)` and called as `(x_BTD, *, update_state=False) ->
y_BTD`; what it reports goes out through `sow` (`sparse_lm.layers.AuxLoss` for loss terms, `nnx.Intermediate`
for metrics).
"""

from typing import Any

import jax
import ml_collections
from flax import nnx


class Mlp(nnx.Module):
  """Defaults that fit a causal MLP with no settings of its own whose parameters every token uses once."""

  @staticmethod
  def defaults() -> dict[str, Any]:
    """The `model.*` keys this variant adds to the base config, with their defaults."""
    return {}

  @staticmethod
  def tiny_config() -> dict[str, Any]:
    """`model.*` overrides under which the variant does real work on a test model (two layers, width 64)."""
    return {}

  @staticmethod
  def check_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises one `ConfigError` line for a value this variant cannot run; called before anything compiles."""
    del cfg

  @staticmethod
  def is_causal(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a token's output never depends on later tokens under these settings."""
    del cfg
    return True

  @staticmethod
  def param_uses_per_token(cfg: ml_collections.ConfigDict, *, computed: bool = True) -> dict[str, float]:
    """Parameters (by name) that a token does not use once in a matmul, with how often it does (or, not
    `computed`, the share of them a token really needs: MoE's active parameters)."""
    del cfg, computed
    return {}

  def __call__(self, x_BTD: jax.Array, *, update_state: bool = False) -> jax.Array:
    """`update_state`: the train step's call, where a layer with non-parameter state (a balancing bias)
    moves it."""
    raise NotImplementedError
