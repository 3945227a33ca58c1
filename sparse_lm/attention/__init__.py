"""Attention variants, chosen by `model.attention`. A new variant is a new file plus one line here.

Each variant is an `nnx.Module` built as `Attention(model_config, rngs=...)` and called as
`(x_BTD, pos_BT, cache=None) -> (y_BTD, cache)`; `init_cache(batch, max_len)` makes its decoding cache.
"""

from sparse_lm.attention import dense, mosa, nsa, routing, sliding_window

REGISTRY = {
    'dense': dense.Attention,
    'sliding_window': sliding_window.Attention,
    'nsa': nsa.Attention,
    'mosa': mosa.Attention,
    'mosa_causal': mosa.CausalAttention,
    'routing': routing.Attention,
    'routing_causal': routing.CausalAttention,
}
