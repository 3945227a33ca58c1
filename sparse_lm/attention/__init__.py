"""Attention variants, chosen by `model.attention`. A new variant is a new file plus one line here: a
subclass of `base.Attention`, whose members (written once there) are all the rest of the project reads.
"""

import math

import ml_collections

from sparse_lm.attention import base, dense, dsa, moba, mosa, nsa, routing, sliding_window

REGISTRY: dict[str, type[base.Attention]] = {
    'dense': dense.Attention,
    'sliding_window': sliding_window.Attention,
    'nsa': nsa.Attention,
    'mosa': mosa.Attention,
    'mosa_causal': mosa.CausalAttention,
    'routing': routing.Attention,
    'routing_causal': routing.CausalAttention,
    'moba': moba.Attention,
    'dsa': dsa.Attention,
}


def document_alignment(cfg: ml_collections.ConfigDict) -> int:
  """The token multiple on which every layer's attention needs documents to start in a packed row (the
  least common multiple of the layers' `document_alignment`; 1 when all work token by token)."""
  variant = REGISTRY[cfg.attention]
  return math.lcm(*(variant.at_layer(cfg, layer).document_alignment(cfg) for layer in range(cfg.num_layers)))


def every_layer(cfg: ml_collections.ConfigDict, capability: str) -> bool:
  """Whether every layer's attention class has `capability` (a ClassVar of `base.Attention`, such as
  `segments` or `context_parallel`): a hybrid has it only if all its kinds do."""
  variant = REGISTRY[cfg.attention]
  return all(getattr(variant.at_layer(cfg, layer), capability) for layer in range(cfg.num_layers))


def having(capability: str) -> list[str]:
  """The registered variants that have `capability`, by name (for the one-line errors that list them)."""
  return sorted(name for name, variant in REGISTRY.items() if getattr(variant, capability))


def reach(cfg: ml_collections.ConfigDict) -> int | None:
  """How far back (tokens) the model's last layer can see through all its layers: None (the whole
  sequence) unless every layer's attention is windowed (`Attention.reach`), then the windows' sum."""
  spans = [variant.reach(cfg) for variant in (REGISTRY[cfg.attention].at_layer(cfg, layer)
                                             for layer in range(cfg.num_layers))]
  return None if any(span is None for span in spans) else sum(spans)


def context_alignment(cfg: ml_collections.ConfigDict) -> int:
  """Tokens each chunk of a sequence split over `mesh.context` must be a multiple of (the least common
  multiple of the layers' `context_alignment`)."""
  variant = REGISTRY[cfg.attention]
  return math.lcm(*(variant.at_layer(cfg, layer).context_alignment(cfg) for layer in range(cfg.num_layers)))
