"""Pallas kernels, each beside its XLA reference in the same file (`implementation='pallas'|'xla'`):
`flash_attention`, NSA's `compressed_attention`, `block_selection` and `selected_attention`, DSA's
`token_attention`, and the MoE
`grouped_matmul` (with its transpose for the weight gradient). Interpret mode on CPU, real lowering for GPU
(Triton) and TPU (Mosaic). `block_choice.select_blocks` is the top-n block rule with configurable forced
blocks that NSA's selection and any other block-sparse variant share."""

from pallas_kernels.block_selection import block_selection, block_selection_reference
from pallas_kernels.compressed_attention import compressed_attention, compressed_attention_reference
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.grouped_matmul import (
  grouped_matmul,
  grouped_matmul_reference,
  transposed_grouped_matmul,
  transposed_grouped_matmul_reference,
)
from pallas_kernels.selected_attention import selected_attention, selected_attention_reference
from pallas_kernels.token_attention import token_attention, token_attention_reference

__all__ = ['block_selection', 'block_selection_reference', 'compressed_attention',
           'compressed_attention_reference', 'flash_attention', 'flash_attention_reference', 'grouped_matmul',
           'grouped_matmul_reference', 'selected_attention', 'selected_attention_reference',
           'token_attention', 'token_attention_reference', 'transposed_grouped_matmul',
           'transposed_grouped_matmul_reference']
