"""The loss a unigram model gets on a config's validation split: the bar `configs/default.py` must
clear. Token frequencies come from the train split (add-one smoothed), the loss is measured on exactly
the tokens `train.py` evaluates on.

    python benchmarks/unigram_baseline.py --config=configs/default.py
"""

import json
import math
import tempfile

import numpy as np
from absl import app
from ml_collections import config_flags

from sparse_lm import data, tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/default.py', 'Experiment config file.')


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  tok = tokenizer.make_tokenizer(config, tempfile.mkdtemp())
  counts_V = np.ones(tok.vocab_size)
  for text in data.train_documents(config):
    ids = np.append(tok.encode(text), tok.eos_id)
    counts_V += np.bincount(ids, minlength=tok.vocab_size)
  logp_V = np.log(counts_V / counts_V.sum())
  nats = tokens = text_bytes = 0.0
  for batch in data.eval_batches(config, tok):
    nats -= logp_V[batch['targets']].sum()
    tokens += batch['targets'].size
    text_bytes += tok.token_bytes[batch['targets']].sum()
  print(json.dumps({'unigram_eval_loss': nats / tokens, 'unigram_eval_bpb': nats / math.log(2) / text_bytes}))


if __name__ == '__main__':
  app.run(main)
