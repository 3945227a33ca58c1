"""Where training numbers go: `metrics.jsonl` (one JSON object per line, each with `step`), a
TensorBoard event log, and a progress bar. Only the primary host writes. Evaluation lines carry
`causal`, whether the architecture is causal (`model.is_causal`): a perplexity of a model that sees
later tokens is not a language model's perplexity, and says so wherever it is shown.

A resumed run starts its logs at the restored step: the lines and TensorBoard events past it (written
before a kill, and about to be written again) are dropped, so every logged step has one line."""

import json
import math
import pathlib
import sys

import jax
import tqdm
from tensorboardX import SummaryWriter

from sparse_lm import rundir


def say(message: str) -> None:
  """One line for the person running the command, on stderr, from the primary host only (above any
  progress bar)."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


class MetricsWriter:

  def __init__(self, workdir: pathlib.Path, *, total_steps: int, start_step: int, is_primary: bool,
               causal: bool = True):
    self.is_primary = is_primary
    self.causal = causal
    self.last: dict[str, float] = {}  # the newest value of every metric written, for the run's summary
    if not is_primary:
      return
    rundir.truncate_metrics(workdir, start_step)
    self.jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
    # TensorBoard drops the events at and after purge_step that an earlier writer left.
    self.tensorboard = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step + 1)
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step', mininterval=1.0,
                         dynamic_ncols=True)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.is_primary:
      return
    values = {k: float(v) for k, v in values.items()}
    self.last.update(values)
    flag = {'causal': self.causal} if 'eval_loss' in values else {}
    self.jsonl.write(json.dumps({'step': step, **values, **flag}) + '\n')
    self.jsonl.flush()
    for key, value in values.items():
      if math.isfinite(value):
        self.tensorboard.add_scalar(key, value, step)
    if 'eval_loss' in values:
      note = '' if self.causal else '  (NOT causal: the model sees later tokens)'
      self.bar.write(f'step {step}: eval_loss {values["eval_loss"]:.4f}  '
                     f'eval_bpb {values["eval_bpb"]:.4f}{note}')
    elif 'loss' in values:
      self.bar.set_postfix(loss=f'{values["loss"]:.3f}', tok_s=f'{values["tokens_per_second"]:.0f}',
                           tflop_s=f'{values["tflops_per_second"]:.3f}', refresh=False)

  def advance(self, step: int) -> None:
    if self.is_primary:
      self.bar.update(step - self.bar.n)

  def close(self) -> None:
    if not self.is_primary:
      return
    self.bar.close()
    self.tensorboard.close()
    self.jsonl.close()
