"""Parameter counts and training FLOPs per token, the one place the project counts compute.

Training FLOPs per token = 6 x (parameters used in matmuls, the unembedding included, each counted by
how often a token uses it: a Mixture-of-Experts token uses only its top-k experts) + the attention
score and value products, 3 x 4 x layers x query heads x head_dim x (keys each query really attends to,
averaged over positions: the attention variant says how many). The factor 3 is forward plus the two
backward matmuls (Kaplan et al. 2020; Hoffmann et al. 2022, App. F). Under document packing the
attention term is counted per document (`DocumentAttention`), from the lengths of the documents trained on.

    python -m sparse_lm.flops --config=configs/default.py [--config.KEY=VALUE ...]
"""

import json
import sys

import jax
import ml_collections
from absl import flags
from flax import nnx

from sparse_lm import checks, cli, mlp, tokenizer
from sparse_lm.errors import ConfigError
from sparse_lm.model import Transformer, attention_class, mlp_name, padded_vocab


def param_sizes(model_cfg: ml_collections.ConfigDict) -> dict[tuple[str, ...], int]:
  """Size of every parameter by its path, from the real module tree built abstractly (no memory)."""
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return {tuple(str(getattr(k, 'key', k)) for k in path): leaf.size
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def mlp_uses(model_cfg: ml_collections.ConfigDict, path: tuple[str, ...], *, computed: bool = True) -> float:
  """How often a token's computation uses a parameter by its block's MLP variant (not `computed`: the
  share a token needs, which capacity buffers do not inflate); 1 outside the MLPs."""
  if len(path) < 4 or path[0] != 'blocks' or path[2] != 'mlp':
    return 1.0
  variant = mlp.REGISTRY[mlp_name(model_cfg, int(path[1]))]
  return variant.param_uses_per_token(model_cfg, computed=computed).get(path[-1], 1.0)


def param_counts(model_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """`active_params` leaves out the share of the experts a token does not use (E - k of E)."""
  sizes = param_sizes(model_cfg)
  total = sum(sizes.values())
  embedding = sum(size for path, size in sizes.items() if path[0] in ('embed', 'unembed'))
  norms = sum(size for path, size in sizes.items() if path[-1] == 'scale')
  inactive = sum(size * (1 - min(1.0, mlp_uses(model_cfg, path, computed=False)))
                 for path, size in sizes.items())
  return {'total_params': total, 'active_params': total - round(inactive), 'embedding_params': embedding,
          'non_embedding_params': total - embedding, 'norm_params': norms}


def flops_per_token(config: ml_collections.ConfigDict) -> dict:
  """Training FLOPs per token at `data.seq_len`, split into parameter and attention parts."""
  m = config.model
  counts = param_counts(m)
  layers = [attention_class(m, layer) for layer in range(m.num_layers)]
  # Norm scales are elementwise, not matmuls; the output layer is a (d_model x vocab) matmul even when
  # it shares its table with the (free) input lookup. Some attention parameters serve many tokens at
  # once (NSA's block compression runs once per block), and count by how often a token uses them, by
  # their layer's class; MLP parameters count the same way by their variant's hook (MoE experts by
  # k / E; the router in full).
  uses = [variant.param_uses_per_token(m) for variant in layers]
  def attention_uses(path):
    return uses[int(path[1])].get(path[-1], 1.0) if path[0] == 'blocks' and path[2] == 'attn' else 1.0
  matmul_params = m.d_model * padded_vocab(m) + sum(
      size * mlp_uses(m, path) * attention_uses(path) for path, size in param_sizes(m).items()
      if path[0] not in ('embed', 'unembed') and path[-1] != 'scale')
  # A hybrid's layers attend differently: the mean over layers.
  keys = sum(variant.attended_keys(m, config.data.seq_len) for variant in layers) / m.num_layers
  attention_flops = 3 * 4 * m.num_layers * m.num_heads * m.head_dim * keys
  param_flops = 6 * matmul_params
  return {**counts, 'seq_len': config.data.seq_len, 'attended_keys_per_query': keys,
          'flops_per_token': {'params': param_flops, 'attention': attention_flops,
                              'total': param_flops + attention_flops}}


class DocumentAttention:
  """The attention FLOPs of packed documents (`data.packing` other than `concat`): each document attends
  only within itself, so a row's attention work is the sum of its documents' (`attended_keys` at each
  document's length, times its length), not the whole row's. Memoised by length: packed rows repeat
  lengths, and a variant's count can be a loop over positions."""

  def __init__(self, config: ml_collections.ConfigDict):
    m = config.model
    self._model = m
    self._layers = [attention_class(m, layer) for layer in range(m.num_layers)]
    self._per_key = 3 * 4 * m.num_heads * m.head_dim  # forward and backward, per query and key, per layer
    self._keys = {}  # document length -> keys its queries attend to, summed over queries and layers

  def _document_keys(self, n: int) -> float:
    if n not in self._keys:
      self._keys[n] = n * sum(variant.attended_keys(self._model, n) for variant in self._layers)
    return self._keys[n]

  def flops(self, lengths: dict[int, int]) -> float:
    """Training FLOPs of the attention products of documents of these lengths (length -> how many)."""
    return self._per_key * sum(count * self._document_keys(int(n)) for n, count in lengths.items())


def main(argv) -> None:
  del argv
  config = flags.FLAGS.config
  try:
    checks.check_model(config.model)
    config.model.vocab_size = config.model.vocab_size or tokenizer.vocab_size_for(config)
  except ConfigError as e:
    sys.exit(f'flops: config error: {e}')
  print(json.dumps(flops_per_token(config), indent=2))


if __name__ == '__main__':
  cli.config_flag('flops')
  cli.run(main, 'flops')
