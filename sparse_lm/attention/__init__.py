"""Attention variants, chosen by `model.attention`. A new variant is a new file plus one line here: a
subclass of `base.Attention`, whose members (written once there) are all the rest of the project reads.
"""

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
