"""FLOP accounting against a count done by hand."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sparse_lm import data, flops
from tests.conftest import REPO, tiny_config


def test_dense_counts_match_hand_count():
  c = tiny_config()  # 2 layers, d=64, 4 heads of 16, 2 kv heads, mlp 128, vocab 259 -> 320, tied
  c.data.seq_len = 8
  d, f, v, layers, heads, kv, hd = 64, 128, 320, 2, 4, 2, 16
  attn = d * heads * hd * 2 + d * kv * hd * 2
  mlp = 3 * d * f
  norms = 2 * d
  per_layer = attn + mlp + norms
  total = v * d + layers * per_layer + d
  got = flops.flops_per_token(c)
  assert got['total_params'] == total
  assert got['embedding_params'] == v * d
  assert got['non_embedding_params'] == total - v * d
  assert got['flops_per_token']['params'] == 6 * (layers * (attn + mlp) + d * v)
  # Causal: query t attends to t + 1 keys, so (1 + ... + 8) / 8 = 4.5 on average.
  assert got['flops_per_token']['attention'] == pytest.approx(12 * layers * heads * hd * 4.5)


def test_window_counts_only_the_window():
  c = tiny_config(attention='sliding_window', window=3)
  c.data.seq_len = 8
  keys = (1 + 2 + 3 * 6) / 8
  assert flops.flops_per_token(c)['attended_keys_per_query'] == pytest.approx(keys)


def test_untied_embeddings_count_the_output_table():
  c = tiny_config(tie_embeddings=False)
  tied = flops.flops_per_token(tiny_config())
  untied = flops.flops_per_token(c)
  assert untied['total_params'] == tied['total_params'] + 320 * 64
  assert untied['flops_per_token']['params'] == tied['flops_per_token']['params']


def test_command_prints_json():
  out = subprocess.run([sys.executable, '-m', 'sparse_lm.flops', '--config=configs/default.py'],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  counts = json.loads(out)
  assert 0.8e6 < counts['total_params'] < 1.3e6
  assert counts['flops_per_token']['total'] > counts['flops_per_token']['params']


def test_nsa_counts_its_three_branches():
  """T=16, l=4, d=2, l'=4, n=3, w=2, counted by hand per position t:
  compressed blocks end at 3, 5, ..., 15, and t sees those ending at or before t: 49 over all t;
  selection: t // 4 + 1 visible blocks, all of them while 3 or fewer (t + 1 keys, 78 for t < 12), then
  two full blocks and the current one's t % 4 + 1 keys (9 + 10 + 11 + 12); window: 1 + 2 x 15 = 31."""
  c = tiny_config(attention='nsa')
  c.model.nsa.update(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=3, window=2)
  c.data.seq_len = 16
  assert flops.flops_per_token(c)['attended_keys_per_query'] == pytest.approx((49 + 78 + 42 + 31) / 16)


def test_moba_counts_its_chosen_blocks_and_the_gate():
  """T=16, block 4, top_k 2, by hand per position t: the own block's t % 4 + 1 keys (4 x 10 = 40 over
  all t), one other whole block once a second block has begun (12 queries x 4 = 48), and the gate's one
  dot product with each begun block's mean, a sixth of a key (4 x (1 + 2 + 3 + 4) / 6)."""
  c = tiny_config(attention='moba')
  c.model.moba.update(block_size=4, top_k=2)
  c.data.seq_len = 16
  assert flops.flops_per_token(c)['attended_keys_per_query'] == pytest.approx((40 + 48 + 40 / 6) / 16)


@pytest.mark.parametrize('attention,slots', [('mosa', 2), ('mosa_causal', 4)])
def test_mosa_counts_the_slots_its_heads_run(attention, slots):
  """T=8, rho=4: the paper's head runs k=2 tokens, mosa_causal's its capacity of 2 k = 4 slots (filled
  or not); 6 MoSA heads of 16 beside the 4 dense heads, 2 layers."""
  c = tiny_config(attention=attention)
  c.model.mosa.update(num_heads=6, sparsity=4, capacity_factor=2.0)
  c.data.seq_len = 8
  got, dense = flops.flops_per_token(c), flops.flops_per_token(tiny_config())
  dense_keys = 4.5  # causal over 8 tokens: (1 + ... + 8) / 8
  sparse_keys = 6 * slots * (slots + 1) / 2 / 8 / 4  # per MoSA head, in units of the 4 dense heads
  assert got['attended_keys_per_query'] == pytest.approx(dense_keys + sparse_keys)
  # 2 layers of Q, K, V, O (64 x 6 heads x 16) applied to `slots` of the 8 tokens
  projections = 2 * 4 * 64 * 6 * 16 * slots / 8
  router = 2 * 64 * 6  # every token scored by 6 heads, 2 layers
  assert got['flops_per_token']['params'] == pytest.approx(dense['flops_per_token']['params']
                                                           + 6 * (projections + router))


@pytest.mark.parametrize('attention,routed', [
    # Faithful: 2 balanced clusters of 4 tokens, causal within: 2 x (1 + 2 + 3 + 4) / 8 keys a token.
    ('routing', 2 * 10 / 8),
    # Causal: 2 clusters of capacity 2 x 8 / 2 = 8 slots, window 6: 2 x (1 + ... + 6 + 6 + 6) / 8.
    ('routing_causal', 2 * 33 / 8)])
def test_routing_counts_its_clusters_and_centroids(attention, routed):
  c = tiny_config(attention=attention)
  c.model.routing.update(num_heads=2, num_clusters=2, window=6, capacity_factor=2.0)
  c.data.seq_len = 8
  local = (1 + 2 + 3 + 4 + 5 + 6 + 6 + 6) / 8  # the 4 local heads, window 6
  centroids = 2 / 2  # 2 centroids scored at 2 h' each, half a key's 4 h'
  got = flops.flops_per_token(c)['attended_keys_per_query']
  assert got == pytest.approx(local + 2 * (routed + centroids) / 4)


@pytest.mark.parametrize('execution,share', [('dropless', 1 / 4), ('capacity', 1.25 / 4)])
def test_moe_counts_active_experts_and_the_router(execution, share):
  """4 experts as wide as the dense MLP, top-1: a token runs one (dropless), or its share of the
  capacity buffers, 1.25 x as many slots as tokens (capacity execution); the router always."""
  c = tiny_config(mlp='moe')
  c.model.moe.update(num_experts=4, top_k=1, granularity=1.0, execution=execution, capacity_factor=1.25)
  dense = flops.flops_per_token(tiny_config())['flops_per_token']['params']
  experts = 2 * 4 * 3 * 64 * 128 * share  # 2 layers, 4 experts of gate/up/down 64 x 128
  router = 2 * 64 * 4
  assert flops.flops_per_token(c)['flops_per_token']['params'] == pytest.approx(
      dense - 6 * 2 * 3 * 64 * 128 + 6 * (experts + router))


def test_dsa_counts_its_tokens_the_indexer_and_its_loss():
  """T=16, top_k 4 tokens, 2 index heads of 8, recall on 4 queries; 4 heads of 16 (768 FLOPs a key over
  all heads, forward and backward). By hand: chosen keys 1 + 2 + 3 + 4 + 12 x 4 = 58; the indexer
  scores 1 + ... + 16 = 136 (query, token) pairs at 2 x 2 x 9 = 36 FLOPs; the KL scores the 58 chosen
  keys with the main heads (2 x 4 x 16 = 128) and the indexer forward and backward (3 x 36); the recall
  4 queries x 16 keys a row with both, per position 4 x (128 + 36)."""
  c = tiny_config(attention='dsa')
  c.model.dsa.update(top_k=4, index_heads=2, index_head_dim=8, recall_queries=4, block_size=1)
  c.data.seq_len = 16
  got, dense = flops.flops_per_token(c), flops.flops_per_token(tiny_config())
  want = (58 + (136 * 36 + 58 * (128 + 3 * 36)) / 768) / 16 + 4 * (128 + 36) / 768
  assert got['attended_keys_per_query'] == pytest.approx(want)
  indexer = 64 * 2 * 8 + 64 * 8 + 64 * 2  # index queries, keys and weights, per layer
  assert got['flops_per_token']['params'] == pytest.approx(dense['flops_per_token']['params']
                                                           + 2 * 6 * indexer * 2 / 3)


def test_dsa_blocks_count_the_own_block_and_the_chosen_ones():
  """T=16, blocks of 4, top_k 8 (2 blocks): per t the own block's t % 4 + 1 keys (40 in all) and one
  other whole block once a second has begun (12 x 4 = 48): 88 chosen keys for the KL too."""
  c = tiny_config(attention='dsa')
  c.model.dsa.update(top_k=8, block_size=4, index_heads=2, index_head_dim=8, recall_queries=4)
  c.data.seq_len = 16
  want = (88 + (136 * 36 + 88 * (128 + 3 * 36)) / 768) / 16 + 4 * (128 + 36) / 768
  assert flops.flops_per_token(c)['attended_keys_per_query'] == pytest.approx(want)


def test_document_packing_counts_attention_per_document():
  """Under document packing a row's attention FLOPs are its documents', from the iterator's lengths."""
  c = tiny_config()
  documents = flops.DocumentAttention(c)
  m = c.model
  per_key = 3 * 4 * m.num_heads * m.head_dim * m.num_layers
  # Dense causal attention: a document of n tokens makes n (n + 1) / 2 query-key products a layer.
  assert documents.flops({10: 2, 1: 3}) == per_key * (2 * 55 + 3 * 1)
  whole = flops.flops_per_token(c)['flops_per_token']['attention'] * c.data.seq_len
  assert documents.flops({c.data.seq_len: 1}) == pytest.approx(whole)
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 2, 2], [3, 3, 3, 3, 3, 3]])
  assert data.document_lengths(seg) == {3: 1, 2: 1, 1: 1, 5: 1, 6: 1}


def test_throughput_counts_the_documents_of_exactly_the_steps_it_measures():
  """The documents noted when a step is logged are its batches'; the batch fetched for the next step
  before the line is written belongs to the next window, and a restart drops what came before it."""
  from sparse_lm import trainer  # pylint: disable=g-import-not-at-top

  fetched = []

  def take():
    lengths, fetched[:] = dict.fromkeys(fetched, 1), []
    return lengths

  class Count:
    def flops(self, lengths):
      return float(sum(n * c for n, c in lengths.items()))

  t = trainer.Throughput(0, 0.0, 0, documents=(take, Count()))
  fetched.append(10)  # step 1's batch
  t.note_documents()
  fetched.append(20)  # step 2's batch, fetched before step 1's line is written
  t.measure(1)
  assert t.attention_flops == 0.0
  t.note_documents()
  assert t.attention_flops == 20.0
  fetched.append(30)
  t.restart(2)  # an evaluation: the window starts again at step 2
  assert t.attention_flops == 0.0 and not fetched
