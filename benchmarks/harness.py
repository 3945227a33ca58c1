"""The lm-evaluation-harness model's throughput against the project's own scoring of the same text.

    python benchmarks/harness.py --workdir=DIR [--documents=64] [--chars=900] [--batch_size=8]

Writes `--documents` pieces of the run's validation split (`--chars` characters each) as a local
lm-eval task (loglikelihood_rolling, bits per byte) and times, after one untimed warm-up each:
- `lm_eval.simple_evaluate(model='sparse_lm', ...)` on that task (requests/s, tokens/s), everything
  lm-eval does included (task building, request bookkeeping, metrics);
- the project's own scoring of the same tokens: the trainer's forward pass in batches of `--batch_size`
  rows padded to the run's length (`trainer.forward`, what `sparse_lm.evaluate`'s perplexity runs).
Both give the same bits per byte where a document fits one window (printed beside the times).
"""

import argparse
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm import data, harness, trainer

TASK = """task: bench_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--documents', type=int, default=64)
  parser.add_argument('--chars', type=int, default=900)
  parser.add_argument('--batch_size', type=int, default=8)
  args = parser.parse_args()
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  run = trainer.load_run(args.workdir)
  texts = []
  for document in data.corpus(run.config, 'validation').documents:
    for i in range(0, len(document) - args.chars, args.chars):
      texts.append(document[i:i + args.chars])
      if len(texts) == args.documents:
        break
    if len(texts) == args.documents:
      break
  tokens = [[run.tok.eos_id, *map(int, run.tok.encode(t))] for t in texts]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / 'docs.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    (tmp / 'bench_rolling.yaml').write_text(TASK.format(path=tmp / 'docs.jsonl'))
    lm = harness.SparseLM(workdir=args.workdir, batch_size=args.batch_size)
    manager = TaskManager(include_path=str(tmp))

    def harness_pass():
      out = lm_eval.simple_evaluate(model=lm, tasks=['bench_rolling'], task_manager=manager,
                                    verbosity='ERROR')
      return out['results']['bench_rolling']['bits_per_byte,none']
    harness_pass()
    start = time.perf_counter()
    harness_bpb = harness_pass()
    harness_seconds = time.perf_counter() - start

  T = run.config.data.seq_len
  forward = jax.jit(lambda params, state, batch: trainer.forward(run.graphdef, params, batch, state)[0])

  def own_pass():
    nll = 0.0
    for first in range(0, len(tokens), args.batch_size):
      rows = tokens[first:first + args.batch_size]
      inputs, targets = np.zeros((args.batch_size, T), np.int32), np.zeros((args.batch_size, T), np.int32)
      mask = np.zeros((args.batch_size, T), np.float32)
      for b, row in enumerate(rows):
        row = row[:T + 1]
        inputs[b, :len(row) - 1], targets[b, :len(row) - 1], mask[b, :len(row) - 1] = row[:-1], row[1:], 1
      nll_BT = forward(*run.variables, {'inputs': jnp.asarray(inputs), 'targets': jnp.asarray(targets)})
      nll += float(jnp.sum(nll_BT * mask))
    return nll
  own_pass()
  start = time.perf_counter()
  nll = own_pass()
  own_seconds = time.perf_counter() - start
  scored = sum(min(len(t), T + 1) - 1 for t in tokens)
  own_bpb = nll / sum(len(t.encode()) for t in texts) / math.log(2)
  print(json.dumps({
      'workdir': args.workdir, 'attention': run.config.model.attention, 'documents': len(texts),
      'tokens': scored, 'seq_len': T, 'batch_size': args.batch_size,
      'harness_seconds': round(harness_seconds, 3),
      'harness_requests_per_s': round(len(texts) / harness_seconds, 2),
      'harness_tokens_per_s': round(scored / harness_seconds, 1), 'harness_bpb': harness_bpb,
      'own_seconds': round(own_seconds, 3), 'own_requests_per_s': round(len(texts) / own_seconds, 2),
      'own_tokens_per_s': round(scored / own_seconds, 1), 'own_bpb': own_bpb,
      'one_window_each': all(len(t) <= T + 1 for t in tokens)}))


if __name__ == '__main__':
  main()
