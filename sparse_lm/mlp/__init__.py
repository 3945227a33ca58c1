"""Feed-forward variants, chosen by `model.mlp`. A new variant is a new file plus one line here: a subclass
of `base.Mlp`, whose members (written once there) are all the rest of the project reads."""

from sparse_lm.mlp import base, dense, moe

REGISTRY: dict[str, type[base.Mlp]] = {
    'dense': dense.Mlp,
    'moe': moe.Mlp,
}
