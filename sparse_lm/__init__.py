"""sparse_lm: language-model pretraining with natively trainable sparse attention and Mixture-of-Experts.

Shape suffixes. A tensor's name ends in its axes, one capital a dimension (`q_BTHD`, `idx_BTKn`), digits
for literal sizes (`_11D`: broadcast axes). These letters mean the same in every file of `sparse_lm/` and
`pallas_kernels/`:

    B  batch rows                      T  query positions (the sequence)
    H  query heads                     K  key/value heads
    G  query heads per kv head, H // K (routing: its groups, one a head and cluster, which its slot
                                          attention treats as heads)
    D  features: the head dimension after a heads axis (`q_BTHD`), the model width otherwise (`x_BTD`)
    F  MLP hidden units                V  vocabulary entries
    E  experts                         J  NSA's branches (compressed, selected, window)
    n  NSA's selected blocks per query X  a flattened axis, named where it is made
    S  key positions; for slot attention (MoSA, routing) the slots, which are its keys

Other letters are a file's own and its docstring or the tensor's first line says what they are: C
(compressed blocks in NSA, clusters in routing), M (MoSA heads, a kernel's rows), R (routing heads), N
(a count of blocks, chunks or tokens), Q and L (the queries and keys of one kernel block), P (prompt
positions). Einsum strings use the suffix letters in lower case where a string can; where the model
width and the head dimension meet in one einsum the head dimension is written `k` or `h` there.
Exceptions, each said in its file's docstring: `grouped_matmul.py` is a matrix kernel and uses the
matrix letters (`lhs_MK`, `rhs_GKN`: rows, contraction, columns and expert groups), and
`block_selection.py` names NSA's selection blocks S (to be renamed).
"""

from sparse_lm import startup

startup.choose()  # before any module of the package imports jax: see startup.py
