"""Feed-forward variants, chosen by `model.mlp`. Each is built as `Mlp(model_config, rngs=...)` and
called as `x_BTD -> y_BTD`. A new variant is a new file plus one line here."""

from sparse_lm.mlp import dense, moe

REGISTRY = {
    'dense': dense.Mlp,
    'moe': moe.Mlp,
}
