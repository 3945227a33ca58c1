"""The contract of an attention variant, written once: subclass `Attention`, override what differs and
add one line to `sparse_lm.attention.REGISTRY`. The config (its defaults), the checks, the FLOP count,
the model, the samplers and the contract tests (`tests/test_variants.py`) read only these members.

A variant is built as `Variant(model_config, rngs=...)` and called as
`(x_BTD, pos_BT, seg_BT=None, cache=None, *, update_state=False) -> (y_BTD, cache)`.

`pos_BT` are the tokens' positions (RoPE's), `seg_BT` their segment ids: a packed row holds several
documents (`data.packing`), numbered 1, 2, ... with 0 for padding, and positions restart at each. A variant
that honours segments (`segments = True`) lets a token see only earlier tokens of its own document, so each
document of a row gets the outputs it would get alone; None means one document a row. Decoding with a
cache is always one document a row (`seg_BT` is None).

The dense family (dense attention and the variants built on it) shares three hooks, which is what those
variants override: `attention_window` (which earlier keys a query sees), `attend` (attention over a whole
sequence, training or a prompt) and `attend_from_cache` (new tokens against a decoding cache).
"""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx


class Attention(nnx.Module):
  """Defaults that fit a causal variant with no settings of its own and no decoding cache."""

  # The output at t never depends on inputs after t. A variant that says False is still trained and
  # scored, flagged as not causal, and its leak is measured by the perturbation probe (sparse_lm.evaluate).
  causal: ClassVar[bool] = True
  # The config check requires model.num_heads * model.head_dim == model.d_model.
  heads_span_width: ClassVar[bool] = True
  # `init_cache` and calls with a cache work (incremental decoding equals the parallel pass).
  decodes: ClassVar[bool] = False
  # Calls with `seg_BT` keep each document to itself (the contract test checks each document of a packed
  # row against the document alone); a variant that says False refuses segment ids, and the config check
  # refuses `data.packing` other than `concat` for it.
  segments: ClassVar[bool] = False
  # Runs with each sequence split over the mesh's `context` axis (`mesh.context > 1`, sparse_lm/context.py):
  # its whole-sequence call takes the zigzag-ordered tokens of the train step and their positions.
  context_parallel: ClassVar[bool] = False

  @classmethod
  def document_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    """Under document packing, each document starts at a multiple of this many tokens of its row (the
    packer pads the document before it, `sparse_lm.data`): a variant whose blocks must not straddle two
    documents asks for its block size, so that a document's blocks are the blocks it has alone."""
    del cfg
    return 1

  @classmethod
  def context_alignment(cls, cfg: ml_collections.ConfigDict) -> int:
    """Under `mesh.context`, each of a sequence's 2 x mesh.context chunks must be a multiple of this
    many tokens (NSA: its compression stride, so that every compressed block starts in one chunk)."""
    del cfg
    return 1

  @classmethod
  def reach(cls, cfg: ml_collections.ConfigDict) -> int | None:
    """How far back one layer of this variant can see: None (any earlier token) unless it is windowed
    (sliding window: its window), so that a stack of them reaches the sum (`attention.reach`)."""
    del cfg
    return None

  @staticmethod
  def defaults() -> dict[str, Any]:
    """The `model.*` keys this variant adds to the base config, with their defaults (a sub-config under
    the variant's name, say); `sparse_lm.config.base_config` merges those of every registered variant."""
    return {}

  @staticmethod
  def tiny_config() -> dict[str, Any]:
    """`model.*` overrides under which the variant does real work on a test model (two layers, width 64,
    four heads of 16, at most 64 tokens): windows, blocks and slots smaller than the sequence."""
    return {}

  @classmethod
  def check_config(cls, cfg: ml_collections.ConfigDict) -> None:
    """Raises one `ConfigError` line for a value this variant cannot run; called before anything compiles."""
    del cfg

  @classmethod
  def at_layer(cls, cfg: ml_collections.ConfigDict, layer: int) -> type['Attention']:
    """The class that runs in block `layer` (0-based, of `cfg.num_layers`): this one, unless the variant
    is a hybrid that keeps some layers another kind (MoBA's last layers dense). The model builds, and
    the FLOP count counts, each layer by it."""
    del cfg, layer
    return cls

  @classmethod
  def attended_keys(cls, cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """Keys one query head attends to, averaged over the positions of a sequence (the FLOP count's
    attention term: 4 head_dim FLOPs a key, forward)."""
    raise NotImplementedError(f'{cls.__name__} must say how many keys a query attends to')

  @classmethod
  def param_uses_per_token(cls, cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Parameters (by name) that a token does not use exactly once in a matmul, with how often it does."""
    del cfg
    return {}

  def keep_settings(self, cfg: ml_collections.ConfigDict) -> None:
    """Keeps the model settings a variant's call reads: the kernel path (`model.kernel`, passed on as
    the kernels' `implementation`), RoPE's base and the compute dtype."""
    self.kernel, self.rope_theta, self.dtype = cfg.kernel, cfg.rope_theta, jnp.dtype(cfg.dtype)

  @staticmethod
  def attention_window(cfg: ml_collections.ConfigDict) -> int | None:
    """The dense family's hook: query `t` sees keys `t - window < s <= t`; None: all earlier ones."""
    del cfg
    return None

  def attend(self, q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array,
             seg_BT: jax.Array | None = None) -> jax.Array:
    """The dense family's hook: attention over a whole sequence (rotated queries and keys), each query
    keeping to its own segment when `seg_BT` is given."""
    raise NotImplementedError(f'{type(self).__name__} has no whole-sequence attention hook')

  def attend_from_cache(self, q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, pos_BT: jax.Array,
                        cache: dict) -> tuple[jax.Array, dict]:
    """The dense family's hook: new tokens at `pos_BT` (their rotated keys and values) against a cache
    whose row s holds position s, and the cache with them written; a prompt into an empty cache runs
    `attend` instead (`kv_cache.prefill_or_extend`)."""
    raise NotImplementedError(f'{type(self).__name__} has no decoding hook')

  def refuse_segments(self, seg_BT: jax.Array | None) -> None:
    """For a variant that does not honour segments yet: one line instead of attention across documents."""
    if seg_BT is not None and not self.segments:
      raise ValueError(f'model.attention={type(self).__module__.rsplit(".", 1)[-1]} does not keep documents '
                       'apart yet; use data.packing=concat')

  def init_cache(self, batch: int, max_len: int) -> Any:
    """The decoding cache for `batch` rows of up to `max_len` positions."""
    raise ValueError(f'model.attention={type(self).__name__} cannot decode with a cache')

  def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
               cache: Any = None, *, update_state: bool = False) -> tuple[jax.Array, Any]:
    """The layer's output and the updated cache (None without one). `update_state`: the train step's
    call, where a layer with non-parameter state (router thresholds, centroids) moves it."""
    raise NotImplementedError
