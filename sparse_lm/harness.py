"""EleutherAI's lm-evaluation-harness (the `lm-eval` package) on a run's checkpoint.

    python -m sparse_lm.harness --model sparse_lm \
        --model_args workdir=DIR[,step=N,batch_size=B,max_length=L] --tasks TASKS [every flag of lm_eval]

`lm_eval --model sparse_lm ...` works the same once the project is installed: lm-eval 0.4 looks a
`--model` name up among its own models and those registered in its process, with no plugin discovery, so
the install adds a .pth whose start-up hook registers `sparse_lm` when lm-eval's registry loads
(`sparse_lm_lm_eval.py`, setup.py). This command is lm_eval's own command line with the model registered
either way, and configuration errors in one line. From Python: `import sparse_lm.harness`, then
`lm_eval.simple_evaluate(model='sparse_lm', model_args='workdir=DIR', tasks=[...])`.

What the model does with the three request types, with the run's own tokenizer:
- `loglikelihood` (multiple choice, say): the context and continuation as lm-eval's causal models encode
  them (whole text encoded, split at the context's length; trailing spaces moved to the continuation),
  after an end-of-document token, as every document of training starts; the continuation's log
  probability and whether it is the greedy one.
- `loglikelihood_rolling` (perplexity tasks): the text in disjoint windows of `max_length` tokens, each
  predicted from the one token before it (lm-eval's rolling windows), summed.
- `generate_until`: greedy (or `do_sample` at `temperature`) decoding with the KV cache until a stop
  string, the end-of-document token or `max_gen_toks` new tokens.
Contexts longer than `max_length` (default the run's training length) keep their last tokens.

A model that is not causal (`model.is_causal`: the papers' MoSA and routing, expert-choice MoE) sees
later tokens, so a token's probability is only honest from a pass over exactly the text before it: such a
model is scored by one pass per prefix (each continuation token from a pass that ends at it) and
generates by re-running the model on the text so far; the results' config says `scoring`.
Causal models score a batch of requests in one pass, padded at the end (which they never see).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from sparse_lm import sample, trainer
from sparse_lm.errors import ConfigError
from sparse_lm.model import is_causal

NAME = 'sparse_lm'


def _positive(name: str, value, default=None) -> int:
  """A model_args value as a positive integer (the text lm-eval passes, or a number)."""
  if value is None or value == '':
    return default
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = 0
  if number < 1 or str(value).strip() not in (str(number), f'{number}.0'):
    raise ConfigError(f'--model_args {name}={value}: must be a positive integer')
  return number


class SparseLM(TemplateLM):
  """A sparse_lm run as an lm-eval model: `workdir` (required), `step` (default the newest complete
  checkpoint), `batch_size` (rows a pass; 'auto' is 8), `max_length` (tokens a pass sees)."""

  def __init__(self, workdir: str | None = None, step=None, batch_size=8, max_length=None, max_gen_toks=256,
               seed: int = 0, **ignored):
    super().__init__()
    del ignored  # lm-eval's device, max_batch_size: one JAX process places its own arrays
    if not workdir:
      raise ConfigError('--model_args workdir=DIR is required: the run (its config.json and checkpoints) '
                        'to evaluate')
    self.run = trainer.load_run(workdir, _positive('step', step))
    self.tok = self.run.tok
    self.causal = is_causal(self.run.config.model)
    self.batch = 8 if str(batch_size).startswith('auto') else _positive('batch_size', batch_size)
    self.max_length = _positive('max_length', max_length, self.run.config.data.seq_len)
    self.max_gen_toks = _positive('max_gen_toks', max_gen_toks)
    self.seed = int(seed)
    graphdef = self.run.graphdef

    def scores(variables, inputs_BT, targets_BT):
      logits_BTV, _ = sample.model_call(graphdef, variables)(inputs_BT)
      logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
      logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
      return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT
    self._scores = jax.jit(scores)
    if not self.causal:
      print(f'{NAME}: model.attention={self.run.config.model.attention} (mlp {self.run.config.model.mlp}) is '
            'NOT causal: every continuation token is scored by a pass over exactly the text before it',
            file=sys.stderr)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> 'SparseLM':
    """`--model_args` over lm_eval's own flags: `batch_size` there wins over `--batch_size`."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> 'SparseLM':
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  # ------------------------------------------------------------------------- what lm-eval asks

  @property
  def eot_token_id(self) -> int:
    return self.tok.eos_id

  @property
  def tokenizer_name(self) -> str:
    return f'{NAME}:{self.run.config.data.tokenizer}'

  def get_model_info(self) -> dict:
    """Written into the results' config by lm-eval."""
    return {'sparse_lm_workdir': str(self.run.workdir), 'sparse_lm_step': self.run.step,
            'attention': self.run.config.model.attention, 'mlp': self.run.config.model.mlp,
            'causal': self.causal, 'max_length': self.max_length,
            'scoring': 'one pass per batch' if self.causal else
                       'exact recomputation per prefix (the model is not causal)'}

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs
    return [int(i) for i in self.tok.encode(string)]

  def tok_decode(self, tokens) -> str:
    return self.tok.decode([int(t) for t in tokens])

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split, after the end-of-document token every training document follows."""
    context_enc, continuation_enc = super()._encode_pair(context, continuation)
    return [self.eot_token_id, *context_enc], continuation_enc

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """`(log p(continuation | context), greedy)` for `((context, continuation), context_enc,
    continuation_enc)` requests, contexts cut to their last tokens where the whole exceeds `max_length`."""
    del kwargs
    pieces = []
    for _, context_enc, continuation_enc in requests:
      if not continuation_enc:
        raise ConfigError('lm-eval asked for the likelihood of an empty continuation')
      whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
      pieces.append((whole[:-1], whole[1:], min(len(continuation_enc), len(whole) - 1)))
    score = self._score_causal if self.causal else self._score_exact
    return score(pieces, disable_tqdm)

  def _score_causal(self, pieces, disable_tqdm: bool) -> list[tuple[float, bool]]:
    """One pass per batch of rows padded at the end to a bucket (`max_length` / 2^k, at least 256 or
    `max_length`): the longest first, so a compiled bucket serves the batches after it."""
    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    out: list = [None] * len(pieces)
    for first in tqdm.trange(0, len(order), self.batch, desc=f'{NAME} scoring', disable=disable_tqdm,
                             file=sys.stderr):
      rows = order[first:first + self.batch]
      T = self._bucket(max(len(pieces[i][0]) for i in rows))
      inputs_BT = np.zeros((len(rows), T), np.int32)
      targets_BT = np.zeros((len(rows), T), np.int32)
      for b, i in enumerate(rows):
        inputs, targets, _ = pieces[i]
        inputs_BT[b, :len(inputs)], targets_BT[b, :len(targets)] = inputs, targets
      logp_BT, greedy_BT = map(np.asarray, self._scores(self.run.variables, inputs_BT, targets_BT))
      for b, i in enumerate(rows):
        inputs, _, n = pieces[i]
        scored = slice(len(inputs) - n, len(inputs))
        out[i] = (float(logp_BT[b, scored].sum()), bool(greedy_BT[b, scored].all()))
    return out

  def _bucket(self, length: int) -> int:
    bucket = self.max_length
    while bucket // 2 >= max(length, 256) and bucket % 2 == 0:
      bucket //= 2
    return bucket

  def _score_exact(self, pieces, disable_tqdm: bool) -> list[tuple[float, bool]]:
    """A model that sees later tokens: continuation token j from a pass over exactly the tokens before
    it; prefixes of one length from all requests share a pass (batches of `batch_size`)."""
    by_length: dict[int, list] = {}
    for i, (inputs, targets, n) in enumerate(pieces):
      for j in range(len(inputs) - n, len(inputs)):
        by_length.setdefault(j + 1, []).append((i, inputs[:j + 1], targets[j]))
    logp, greedy = np.zeros(len(pieces)), np.ones(len(pieces), bool)
    jobs = [(length, group[k:k + self.batch]) for length, group in sorted(by_length.items())
            for k in range(0, len(group), self.batch)]
    for length, group in tqdm.tqdm(jobs, desc=f'{NAME} scoring (per prefix)', disable=disable_tqdm,
                                   file=sys.stderr):
      inputs_BT = np.asarray([prefix for _, prefix, _ in group], np.int32)
      targets_BT = np.zeros_like(inputs_BT)
      targets_BT[:, -1] = [target for _, _, target in group]
      logp_BT, greedy_BT = map(np.asarray, self._scores(self.run.variables, inputs_BT, targets_BT))
      for b, (i, _, _) in enumerate(group):
        logp[i] += logp_BT[b, length - 1]
        greedy[i] &= bool(greedy_BT[b, length - 1])
    return [(float(p), bool(g)) for p, g in zip(logp, greedy, strict=True)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood over disjoint windows of `max_length` tokens, the first after the
    end-of-document token, each later one predicted from the token before it."""
    windows, owners = [], []
    for r, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append(((text, None), context, continuation))
        owners.append(r)
    totals = np.zeros(len(requests))
    for r, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
      totals[r] += logp
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Decoding until a stop string (`until`), the end-of-document token or `max_gen_toks` tokens;
    prompts of one length and settings decode together, `batch_size` rows at a time."""
    groups: dict[tuple, list] = {}
    for r, (context, kwargs) in enumerate(req.args for req in requests):
      kwargs = dict(kwargs or {})
      until = kwargs.pop('until', None) or []
      until = [until] if isinstance(until, str) else list(until)
      new = _positive('max_gen_toks', kwargs.pop('max_gen_toks', None), self.max_gen_toks)
      new = min(new, self.max_length - 1)
      temperature = float(kwargs.pop('temperature', 0.0)) if kwargs.pop('do_sample', False) else 0.0
      prompt = [self.eot_token_id, *self.tok_encode(context)][-(self.max_length - new):]
      groups.setdefault((len(prompt), new, temperature), []).append((r, prompt, until))
    out: list = [None] * len(requests)
    jobs = [(key, group[k:k + self.batch]) for key, group in groups.items()
            for k in range(0, len(group), self.batch)]
    for (_, new, temperature), rows in tqdm.tqdm(jobs, desc=f'{NAME} generating', disable=disable_tqdm,
                                                 file=sys.stderr):
      prompts_BP = jnp.asarray([prompt for _, prompt, _ in rows], jnp.int32)
      new_BN = np.asarray(sample.generate(self.run.graphdef, self.run.variables, prompts_BP, new,
                                          jax.random.key(self.seed), temperature=temperature,
                                          causal=self.causal))
      for (r, _, until), ids in zip(rows, new_BN, strict=True):
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
          ids = ids[:ids.index(self.eot_token_id)]
        text = self.tok_decode(ids)
        for stop in until:
          text = text.split(stop)[0] if stop else text
        out[r] = text
    return out


# Installed, the project's .pth has registered `sparse_lm` as 'sparse_lm.harness:SparseLM' already
# (sparse_lm_lm_eval.py); otherwise (the repository on PYTHONPATH, say) this module registers it.
if NAME not in model_registry:
  model_registry.register(NAME, target=SparseLM)


def main() -> None:
  """lm_eval's command line, with `--model sparse_lm` known; configuration errors in one line."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  try:
    cli_evaluate()
  except ConfigError as e:
    sys.exit(f'harness: {e}')
  except ValueError as e:  # lm_eval's own for a task name it does not know
    if not str(e).startswith('Tasks not found'):
      raise
    sys.exit(f'harness: {e} (`lm_eval ls tasks` lists the known ones; local YAML tasks need '
             '--include_path DIR)')


if __name__ == '__main__':
  main()
