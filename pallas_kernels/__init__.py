"""Pallas kernels (flash attention, NSA selected-block attention, grouped matmul), each beside its XLA
reference. The kernels themselves arrive with the kernels issue; until then `model.kernel` accepts
only 'xla'."""
