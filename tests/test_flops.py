"""FLOP accounting against a count done by hand."""

import json
import subprocess
import sys

import pytest

from sparse_lm import flops
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
