"""The training loop: one jitted, sharded, donated train step; evaluation; checkpoints that resume
exactly; metrics. `train.py` is its command line."""

import dataclasses
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from sparse_lm import (
  checkpoint,
  checks,
  context,
  data,
  distributed,
  flops,
  optim,
  rundir,
  sharding,
  tokenizer,
)
from sparse_lm.checkpoint import Checkpointer
from sparse_lm.errors import ConfigError
from sparse_lm.layers import AuxLoss
from sparse_lm.metrics import MetricsWriter, say
from sparse_lm.model import Transformer, is_causal

# {'params': pure dict, 'model_state': pure dict, 'opt_state': optax state, 'step': int32 scalar}.
# `model_state` holds the model's variables that are not parameters, which layers update in the train
# step outside the gradient (the MoE balancing bias); it is empty for most models.
State = dict


# ----------------------------------------------------------------------------- model and state

def split_model(model_cfg: ml_collections.ConfigDict):
  """The model's structure without its values, its abstract parameters (with `axes`) and its abstract
  non-parameter state."""
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param, ...)


def state_shardings(abstract_params, tx: optax.GradientTransformation, mesh,
                    abstract_model_state=None) -> State:
  """Optimizer moments are split exactly like the parameters they track; counters are replicated."""
  params_sh = sharding.param_shardings(abstract_params, mesh)
  opt_abstract = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, params_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  model_state_sh = ({} if abstract_model_state is None
                    else sharding.param_shardings(abstract_model_state, mesh))
  return {'params': params_sh, 'model_state': model_state_sh, 'opt_state': opt_sh,
          'step': sharding.replicated(mesh)}


def placed(tree, shardings):
  """Abstract arrays of `tree`'s shapes and dtypes placed by `shardings` (a tree of the same structure):
  what a checkpoint restore fills and a compile-only lowering takes."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(config: ml_collections.ConfigDict, tx, shardings: State) -> State:
  return placed(jax.eval_shape(state_init_fn(config, tx), jax.random.key(0)), shardings)


def state_init_fn(config: ml_collections.ConfigDict, tx):
  def init(key) -> State:
    model = Transformer(config.model, rngs=nnx.Rngs(params=key))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    return {'params': params, 'model_state': nnx.to_pure_dict(model_state),
            'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  return init


# ----------------------------------------------------------------------------- steps

def forward(graphdef, params, batch, model_state=None, *, update_state: bool = False
            ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], dict]:
  """Per-token negative log-likelihood, plus what the layers sow: `layers.AuxLoss` values add up to the
  auxiliary loss, other `nnx.Intermediate` ones are metrics (averaged over repeated sows), keyed by their
  path in the model, e.g. `blocks/2/mlp/expert_load`. Last, the model's non-parameter state after the
  pass: moved by the layers that keep such state with `update_state` (the train step), otherwise as it
  was."""
  model = nnx.merge(graphdef, params, {} if model_state is None else model_state)
  split = context.size()
  if split > 1:  # each device's share of a row: an early and a late chunk (sparse_lm/context.py)
    batch = context.reorder(batch, split)
  # AuxLoss is an nnx.Intermediate: asked for first, its values are not captured again as metrics.
  (logits_BTV, _), losses, sown = nnx.capture(model, AuxLoss, nnx.Intermediate)(
      batch['inputs'], segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
      update_state=update_state)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
  if split > 1:  # back to the batch's order, in which the caller's masks are
    nll_BT = context.restore(nll_BT, split)
  def mean_of_sows(variable):
    return jnp.mean(jnp.stack(variable.value), axis=0)
  aux_loss = sum((mean_of_sows(v) for _, v in nnx.to_flat_state(losses)), jnp.zeros((), jnp.float32))
  metrics = {'/'.join(map(str, path)): mean_of_sows(v) for path, v in nnx.to_flat_state(sown)}
  _, _, new_model_state = nnx.split(model, nnx.Param, ...)
  return nll_BT, aux_loss, metrics, nnx.to_pure_dict(new_model_state)


def loss_mask(batch) -> jax.Array:
  """1.0 where a target counts in the loss and every metric: all of them, except under document packing
  padding and the step from one document to the next (the batch's 'loss_mask')."""
  if 'loss_mask' not in batch:
    return jnp.ones(batch['targets'].shape, jnp.float32)
  return batch['loss_mask'].astype(jnp.float32)


def make_train_step(graphdef, tx, schedule, accum_steps: int, *, skip_nonfinite: bool = False):
  """The step; its metrics hold `finite`, whether the loss and gradient norm were finite. With
  `skip_nonfinite` a step that was not keeps the state it started from (the step counter still advances
  past its batch)."""
  def loss_fn(params, model_state, batch):
    nll_BT, aux_loss, metrics, model_state = forward(graphdef, params, batch, model_state,
                                                     update_state=True)
    mask_BT = loss_mask(batch)
    loss = jnp.sum(nll_BT * mask_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)
    return loss + aux_loss, ({'loss': loss, 'aux_loss': aux_loss, **metrics}, model_state)

  def grads_of(params, model_state, batch):
    """Gradients, and (metrics, new model state); with accumulation, all are microbatch means (every
    microbatch starts from the same model state, so its updates are averaged too)."""
    if accum_steps == 1:
      return jax.grad(loss_fn, has_aux=True)(params, model_state, batch)
    # Row r goes to microbatch r % A, so each device's rows split evenly over the microbatches and
    # no data moves between devices.
    def split(x_BT):
      x_bAT = x_BT.reshape(x_BT.shape[0] // accum_steps, accum_steps, *x_BT.shape[1:])
      return jnp.swapaxes(x_bAT, 0, 1)
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, jax.grad(loss_fn, has_aux=True)(params, model_state, mb)), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(jax.grad(loss_fn, has_aux=True), params,
                                                        model_state, jax.tree.map(lambda x: x[0], micro)))
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / accum_steps, total)

  def train_step(state: State, batch) -> tuple[State, dict]:
    grads, (metrics, model_state) = grads_of(state['params'], state['model_state'], batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {'params': optax.apply_updates(state['params'], updates), 'model_state': model_state,
           'opt_state': opt_state}
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics['loss'] + metrics['aux_loss']) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {key: state[key] for key in new})
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state['step']), finite=finite)
    return {**new, 'step': state['step'] + 1}, metrics
  return train_step


def make_eval_step(graphdef, token_bytes: np.ndarray):
  """Sums of nats, target tokens and the text bytes those tokens stand for (for bits per byte)."""
  token_bytes_V = jnp.asarray(token_bytes, jnp.float32)

  def eval_step(params, model_state, batch):
    nll_BT, _, _, _ = forward(graphdef, params, batch, model_state)
    mask_BT = loss_mask(batch)
    return {'nats': jnp.sum(nll_BT * mask_BT), 'tokens': jnp.sum(mask_BT),
            'bytes': jnp.sum(token_bytes_V[batch['targets']] * mask_BT)}
  return eval_step


def _sums(eval_step, params, model_state, batches, mesh) -> dict[str, float]:
  sums = {'nats': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in batches:
    out = jax.device_get(eval_step(params, model_state, sharding.global_batch(batch, mesh)))
    sums = {k: sums[k] + float(out[k]) for k in sums}
  return sums


def _losses(sums: dict[str, float], suffix: str = '') -> dict[str, float]:
  return {f'eval_loss{suffix}': sums['nats'] / sums['tokens'],
          f'eval_bpb{suffix}': sums['nats'] / math.log(2) / sums['bytes']}


def evaluate(eval_step, params, model_state, batches, mesh) -> dict[str, float]:
  """Loss and bits per byte over `batches`; given a dict of named sets (a mixture's sources), over all of
  them and per set as well (`eval_loss_NAME`, `eval_bpb_NAME`)."""
  if not isinstance(batches, dict):
    return _losses(_sums(eval_step, params, model_state, batches, mesh))
  per_set = {name: _sums(eval_step, params, model_state, sets, mesh) for name, sets in batches.items()}
  total = {k: sum(sums[k] for sums in per_set.values()) for k in ('nats', 'tokens', 'bytes')}
  named = {} if set(per_set) == {''} else {
      key: value for name, sums in per_set.items() for key, value in _losses(sums, f'_{name}').items()}
  return {**_losses(total), **named}


# ----------------------------------------------------------------------------- stopping

class Stopped(Exception):  # noqa: N818 -- not an error: the run stopped when asked, its state saved
  """The run stopped on a signal after saving; `status` is the process's exit status."""

  def __init__(self, status: int):
    super().__init__(status)
    self.status = status


class StopSignals:
  """SIGTERM (preemption) or Ctrl-C on any host becomes a stop at a step boundary every host agrees on,
  where the run saves a checkpoint; a second Ctrl-C exits at once, leaving the newest complete checkpoint
  as it is (a save cut short is never resumed from, `checkpoint.py`).

  One process: Python handlers set a flag the loop checks between steps. Several: JAX's preemption sync
  manager (started by `jax.distributed.initialize`) catches SIGTERM on whichever host gets it, tells the
  others through the coordinator, and picks the step after the furthest host's current one; `reached(step)`
  is true at that step on every host, so all of them save the same step and stop. No Python SIGTERM
  handler may replace JAX's then, and a Ctrl-C is passed to it as a SIGTERM to this process.
  """

  SIGINT_STATUS = 130  # the shell's status for a command ended by Ctrl-C

  def __init__(self, checkpoints: pathlib.Path):
    self.checkpoints = checkpoints
    self.requested = False
    self.name = 'SIGTERM'  # what asked for the stop
    self._multihost = jax.process_count() > 1
    handlers = {signal.SIGINT: self._interrupt}
    if not self._multihost:
      handlers[signal.SIGTERM] = self._terminate
    self._previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}

  @property
  def status(self) -> int:
    """130 for a Ctrl-C on one process; 0 for preemption, and on many hosts, where one host's non-zero
    status would make a launcher kill the others while they finish the agreed save."""
    return self.SIGINT_STATUS if self.name == 'Ctrl-C' and not self._multihost else 0

  def _terminate(self, signum, frame):
    del signum, frame
    self.requested = True

  def _interrupt(self, signum, frame):
    """Python runs this between two bytecodes of the main thread, possibly inside a write to stderr: it
    writes to the file descriptor, not through sys.stderr's buffer."""
    del signum, frame
    if self.name == 'Ctrl-C':
      newest = checkpoint.newest_on_disk(self.checkpoints)
      kept = f'{self.checkpoints / str(newest)} is the newest checkpoint' if newest is not None else (
          'no checkpoint was saved')
      _tell(f'train: second Ctrl-C, stopped at once without saving; {kept}')
      os._exit(self.SIGINT_STATUS)  # no clean-up: a save in flight is left incomplete, never resumed from
    self.name = 'Ctrl-C'
    _tell('train: Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops '
          'at once, without saving)')
    if self._multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler, which tells every host
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; every host must call it at every step."""
    if self._multihost:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _tell(message: str) -> None:
  """One line on stderr from a signal handler, on the host the signal reached."""
  os.write(sys.stderr.fileno(), f'\n{message}\n'.encode())


# ----------------------------------------------------------------------------- divergence

class Diverged(RuntimeError):
  """The run stopped on a non-finite loss or gradient norm; the message is one line."""


class NonFiniteGuard:
  """Reads each step's `finite` flag one step late (after the next step is dispatched, so the device
  never waits for the host), and at a checkpoint the saved step's own flag first.

  `stop`: the first non-finite step raises `Diverged`; the state it produced is never saved, so the
  newest checkpoint is the last finite one. `skip`: such a step left the state as it was (see
  `make_train_step`); it is counted, and `max_skipped` in a row raise `Diverged`.
  """

  def __init__(self, mode: str, max_skipped: int):
    self.mode, self.max_skipped = mode, max_skipped
    self.skipped = 0  # steps skipped by this process
    self.consecutive = 0
    self._unread = None  # (step, metrics) of the newest dispatched step

  def dispatched(self, step: int, metrics) -> None:
    self.read_all()  # the step before, which the device has finished or nearly
    self._unread = (step, metrics)

  def read_all(self) -> None:
    """Reads the newest step's flag (waits for that step): before saving it, and at the end."""
    unread, self._unread = self._unread, None
    if unread is not None:
      self._read(*unread)

  def _read(self, step: int, metrics) -> None:
    if bool(jax.device_get(metrics['finite'])):
      self.consecutive = 0
      return
    loss, grad_norm, lr = (float(jax.device_get(metrics[k])) for k in ('loss', 'grad_norm', 'learning_rate'))
    where = f'step {step}: loss {loss:.4g}, grad_norm {grad_norm:.4g} at learning_rate {lr:.4g}'
    if self.mode == 'stop':
      raise Diverged(f'non-finite {where}; that state was not saved. Lower train.learning_rate (or set '
                     'train.on_nonfinite=skip)')
    self.skipped += 1
    self.consecutive += 1
    if self.consecutive >= self.max_skipped:
      raise Diverged(f'{self.consecutive} non-finite steps in a row (train.max_skipped_steps='
                     f'{self.max_skipped}), the last at {where}. Lower train.learning_rate')


# ----------------------------------------------------------------------------- the loop

def check(config: ml_collections.ConfigDict) -> None:
  """Checks the config, and completes what it leaves to the data. A warmup longer than the run (the
  default config's 50 steps in a 30-step smoke test) is shortened, in one line."""
  data.resolve_tokenizer(config)  # tokens:DIR trains with the tokenizer its shards were made with
  t = config.train
  if isinstance(t.steps, int) and isinstance(t.warmup_steps, int) and t.warmup_steps >= t.steps >= 1:
    fitted = optim.short_run_warmup(t.steps, t.warmup_steps)
    logging.warning('train.warmup_steps=%d does not fit in train.steps=%d: warming up over %d steps instead',
                    t.warmup_steps, t.steps, fitted)
    t.warmup_steps = fitted
  checks.check_config(config, num_devices=jax.device_count(), process_count=jax.process_count())


def prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """Builds the tokenizer (training a SentencePiece model into `workdir` the first time) and fixes the
  vocabulary size from it."""
  tok = tokenizer.make_tokenizer(config, workdir)
  with config.unlocked():
    config.model.vocab_size = tok.vocab_size
  return tok


class Throughput:
  """Tokens/s and model TFLOP/s between two reads of finished steps. The first window of a run
  includes compilation; evaluation time is left out by `restart`. Under document packing
  (`documents`: the train iterator's `take_document_lengths` and a `flops.DocumentAttention`) the
  attention FLOPs are those of the documents the steps trained on, summed over every host."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, start_step: int, documents=None):
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.documents = documents
    self.restart(start_step)

  def restart(self, step: int) -> None:
    """A new window from `step` on; the documents fetched so far (none past `step`) are not in it."""
    self._window_from(step)
    if self.documents is not None:
      self.documents[0]()

  def _window_from(self, step: int) -> None:
    self.step, self.time = step, time.perf_counter()
    self.attention_flops = 0.0  # this host's, of the documents of the steps since `step`

  def note_documents(self) -> None:
    """Counts the documents of the batches fetched so far; called right after a step is dispatched, so
    they are exactly the steps' batches (the next one is not fetched yet)."""
    if self.documents is not None:
      take, attention = self.documents
      self.attention_flops += attention.flops(take())

  def _flops(self, steps: int) -> float:
    """The model FLOPs of `steps` steps: all of them per token, or, under document packing, the
    parameters' per token and attention's per document."""
    flops = steps * self.tokens_per_step * self.flops_per_token
    if self.documents is None:
      return flops
    return flops + sum(distributed.allgather_json(self.attention_flops))

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    tokens_per_second = (step - self.step) * self.tokens_per_step / (now - self.time)
    tflops = self._flops(step - self.step) / (now - self.time) / 1e12
    self._window_from(step)  # the batch fetched after `step` stays counted for the next window
    return {'tokens_per_second': tokens_per_second, 'tflops_per_second': tflops,
            'tflops_per_second_per_device': tflops / jax.device_count()}


@dataclasses.dataclass
class Session:
  """Everything a run needs before its first step; built by `set_up`, run by `run`."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  eval_data: dict  # the evaluation batches of each source (one, named '', but for a mixture)
  train_iter: object
  checkpointer: Checkpointer
  state: State
  start_step: int
  train_step: object
  eval_step: object
  writer: MetricsWriter
  throughput: 'Throughput'
  lock: object  # the open `train.lock` of the primary host (None on the others), held until the run ends
  eval_tasks: object = None  # (params, model_state, step) -> metrics of train.eval_tasks, or None


def set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Session:
  """Everything that can fail on a bad config or a rerun that does not match the saved run fails here,
  before compilation and before anything in `workdir` is written; the state is restored from the newest
  complete checkpoint, else freshly initialised; the steps are jitted once, the state donated so
  parameters update in place."""
  t, is_primary = config.train, jax.process_index() == 0
  saved = rundir.read_config(workdir)
  check(config)
  changes = rundir.resume_changes(workdir, saved, config) if saved is not None else []
  workdir.mkdir(parents=True, exist_ok=True)
  lock = rundir.lock(workdir) if is_primary else None
  tok = prepare(config, workdir)
  eval_data = data.eval_sets(config, tok, process_index=jax.process_index(),
                             process_count=jax.process_count())
  mesh = sharding.make_mesh(config.mesh)

  tx, schedule = optim.make_optimizer(t)
  graphdef, abstract_params, abstract_model_state = split_model(config.model)
  shardings = state_shardings(abstract_params, tx, mesh, abstract_model_state)
  eval_tasks = None
  if t.eval_tasks:  # a task that cannot run at data.seq_len fails here, before anything is restored
    from sparse_lm import evaluate  # pylint: disable=g-import-not-at-top  # evaluate imports this module
    eval_tasks = evaluate.in_training(config, tok, graphdef, workdir)
  init_fn = state_init_fn(config, tx)
  checkpointer = Checkpointer(workdir / 'checkpoints', every_steps=config.checkpoint.every_steps,
                              keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  train_iter = data.make_train_iterator(config, tok, process_index=jax.process_index(),
                                        process_count=jax.process_count())
  restored = _restore(checkpointer, abstract_state(config, tx, shardings), workdir)
  if restored is None:
    start_step, state = 0, jax.jit(init_fn, out_shardings=shardings)(jax.random.key(t.seed))
    say(f'train: {"starting over" if saved else "new run"} in {workdir}: {t.steps} steps of '
        f'{t.batch_size} x {config.data.seq_len} tokens')
  else:
    start_step, state, data_state = restored
    train_iter.set_state(data_state)
    say(f'train: resuming {workdir} from step {start_step} (checkpoint '
        f'{workdir / "checkpoints" / str(start_step)}), to step {t.steps}')
  for change in changes:
    say(f'train: changed on resume: {change}')
  if is_primary:
    rundir.write_config(workdir, config)

  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(make_train_step(graphdef, tx, schedule, t.grad_accum_steps,
                                       skip_nonfinite=t.on_nonfinite == 'skip'),
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef, tok.token_bytes),
                      in_shardings=(shardings['params'], shardings['model_state'], batch_sh))
  train_step, eval_step = sharding.on_mesh(train_step, mesh), sharding.on_mesh(eval_step, mesh)
  writer = MetricsWriter(workdir, total_steps=t.steps, start_step=start_step, is_primary=is_primary,
                         causal=is_causal(config.model))
  counted = flops.flops_per_token(config)['flops_per_token']
  if config.data.packing == 'concat':
    throughput = Throughput(t.batch_size * config.data.seq_len, counted['total'], start_step)
  else:
    throughput = Throughput(t.batch_size * config.data.seq_len, counted['params'], start_step,
                            documents=(train_iter.take_document_lengths, flops.DocumentAttention(config)))
  return Session(config, mesh, eval_data, train_iter, checkpointer, state, start_step, train_step,
                 eval_step, writer, throughput, lock, eval_tasks)


def _restore(checkpointer: Checkpointer, abstract: State, workdir: pathlib.Path):
  """The newest checkpoint, or one line when it does not fit this config's state (closing the manager,
  whose background threads would otherwise print pages of errors at exit)."""
  try:
    return checkpointer.restore(abstract)
  except ValueError as error:
    checkpointer.close()
    first = (str(error).strip().splitlines() or [''])[0]
    raise ConfigError(f'--workdir={workdir}: its newest checkpoint does not fit this config\'s state '
                      f'({first}); use a new --workdir') from None


class TrainLog:
  """Writes a logged step's metrics one step late, once the next step is dispatched, so the device
  never waits for the host. A mixture's lines also count the tokens drawn from each source so far
  (`tokens_NAME`, over every host)."""

  def __init__(self, writer: MetricsWriter, throughput: Throughput, guard: NonFiniteGuard, train_iter):
    self.writer, self.throughput, self.guard, self.train_iter = writer, throughput, guard, train_iter
    self._pending = None  # (step, metrics, tokens drawn per source by this host)

  def hold(self, step: int, metrics) -> None:
    self.throughput.note_documents()
    mixture = len(self.train_iter.names) > 1
    self._pending = (step, metrics, self.train_iter.drawn() if mixture else None)

  def flush(self) -> None:
    """Every host calls it at the same steps (a mixture's counts are summed over them)."""
    if self._pending is None:
      return
    (step, metrics, drawn), self._pending = self._pending, None
    values = {'skipped_steps': float(self.guard.skipped)} if self.guard.mode == 'skip' else {}
    if drawn is not None:
      for host in distributed.allgather_json(drawn):
        for name, count in host.items():
          values[f'tokens_{name}'] = values.get(f'tokens_{name}', 0.0) + count
    for key, value in jax.device_get(metrics).items():
      if np.ndim(value) == 0:
        values[key] = float(value)
      else:  # a vector metric (say, the load of each expert) becomes one scalar per entry
        values.update({f'{key}_{i}': float(v) for i, v in enumerate(np.ravel(value))})
    self.writer.write(step, {**values, **self.throughput.measure(step)})


def run(session: Session, stop: StopSignals) -> dict:
  """The steps from `session.start_step` on, with evaluation, logging and checkpoints; returns the last
  evaluation's metrics. A stop signal saves and stops at a step every host agrees on, then raises
  `Stopped`; a non-finite step raises `Diverged` once the last good checkpoint is committed."""
  s, t = session, session.config.train
  guard = NonFiniteGuard(t.on_nonfinite, t.max_skipped_steps)
  log = TrainLog(s.writer, s.throughput, guard, s.train_iter)
  state, evaluated, step, started = s.state, {}, s.start_step, time.monotonic()
  try:
    for step in range(s.start_step + 1, t.steps + 1):
      state, metrics = s.train_step(state, sharding.global_batch(next(s.train_iter), s.mesh))
      guard.dispatched(step, metrics)
      log.flush()
      if step % t.log_every == 0 or step == t.steps:
        log.hold(step, metrics)
      if step % t.eval_every == 0 or step == t.steps:
        log.flush()
        evaluated = evaluate(s.eval_step, state['params'], state['model_state'], s.eval_data, s.mesh)
        if s.eval_tasks is not None:
          evaluated = {**evaluated, **s.eval_tasks(state['params'], state['model_state'], step)}
        s.writer.write(step, evaluated)
        s.throughput.restart(step)
      final = stop.reached(step) or step == t.steps
      if final or s.checkpointer.should_save(step):
        guard.read_all()
        log.flush()  # a step's line is written before its checkpoint, so a resume never leaves a gap
        s.checkpointer.save(step, state, data.gather_state(s.train_iter), force=final)
      s.writer.advance(step)
      if stop.requested:
        break
    guard.read_all()
    log.flush()
  except Diverged as error:
    s.checkpointer.wait()  # the last good save in flight is committed before the run stops
    newest = s.checkpointer.latest_step()
    resume = (f'rerunning resumes from its newest checkpoint, step {newest}' if newest is not None else
              'no checkpoint was saved, so rerunning starts from step 0')
    raise Diverged(f'{error}; {resume}.') from None
  finally:
    s.checkpointer.wait()
    s.checkpointer.close()
    s.writer.close()
    if s.lock is not None:
      s.lock.close()
  say(_summary(s, step, time.monotonic() - started, stop))
  if stop.requested:
    raise Stopped(stop.status)
  return evaluated


def _summary(s: Session, step: int, seconds: float, stop: StopSignals) -> str:
  """One line at the end of a run: where it got to, what it cost, its last numbers and checkpoint."""
  t = s.config.train
  tokens = (step - s.start_step) * t.batch_size * s.config.data.seq_len
  minutes, secs = divmod(round(seconds), 60)
  numbers = ', '.join(f'{key} {s.writer.last[key]:.4f}' for key in ('loss', 'eval_loss', 'eval_bpb')
                      if key in s.writer.last)
  newest = checkpoint.newest_on_disk(s.checkpointer.directory)
  where = f'newest checkpoint {s.checkpointer.directory / str(newest)}' if newest is not None else (
      'no checkpoint')
  if stop.requested:
    head = f'stopped by {stop.name} after step {step} of {t.steps}'
    tail = '; rerun the same command to resume'
  elif s.start_step == t.steps:
    head, tail = f'already finished: step {step} of {t.steps}', ' (raise train.steps to train on)'
  else:
    head, tail = f'finished step {step} of {t.steps}', ''
  return (f'train: {head}; this session {step - s.start_step} steps, {tokens:,} tokens in '
          f'{minutes}m{secs:02d}s{"; " + numbers if numbers else ""}; {where}{tail}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last evaluation's metrics. Raises `Stopped`
  after a stop signal was honoured (a checkpoint saved)."""
  workdir = pathlib.Path(workdir)
  stop = StopSignals(workdir / 'checkpoints')  # from the start: a Ctrl-C while compiling is honoured too
  try:
    return run(set_up(config, workdir), stop)
  finally:
    stop.restore()


# ----------------------------------------------------------------------------- a finished run

@dataclasses.dataclass(frozen=True)
class Run:
  """A run as evaluation and sampling read it: its config (with the vocabulary size), tokenizer, model
  structure, newest variables (parameters and non-parameter state, on the default device) and step."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  tok: object
  graphdef: object
  variables: tuple
  step: int


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> Run:
  """The run in `workdir` at its newest complete checkpoint, or at `step`."""
  workdir = pathlib.Path(workdir)
  saved = rundir.read_config(workdir) if workdir.is_dir() else None
  if saved is None:
    raise ConfigError(f'--workdir={workdir}: no run there (no config.json); train one with '
                      f'python train.py --workdir={workdir}')
  config = ml_collections.ConfigDict(saved)
  tok = tokenizer.make_tokenizer(config, workdir)
  config.model.vocab_size = tok.vocab_size
  tx, _ = optim.make_optimizer(config.train)
  graphdef, _, _ = split_model(config.model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(state_init_fn(config, tx), jax.random.key(0))
  checkpointer = Checkpointer(workdir / 'checkpoints', every_steps=1, keep=config.checkpoint.keep)
  saved_steps = sorted(checkpointer.steps())
  if step is not None and step not in saved_steps:
    checkpointer.close()
    raise ConfigError(f'--workdir={workdir}: no complete checkpoint of step {step} (saved: '
                      f'{", ".join(map(str, saved_steps)) or "none"})')
  restored = checkpointer.restore(placed(shapes, jax.tree.map(lambda _: device, shapes)), step)
  checkpointer.close()
  if restored is None:
    raise ConfigError(f'--workdir={workdir}: no complete checkpoint under {workdir / "checkpoints"} yet')
  step, state, _ = restored
  return Run(workdir, config, tok, graphdef, (state['params'], state['model_state']), step)
