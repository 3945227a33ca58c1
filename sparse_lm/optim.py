"""AdamW with global-norm clipping, warmup then cosine or warmup-stable-decay (WSD) learning rates,
and weight decay on matrices only (norm scales and biases are left alone)."""

import jax
import ml_collections
import optax


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """The rate for the update whose optimizer count is `count` (0 for the first update)."""
  base = _schedule_from_one(t)
  # Shifted by one so the first update already moves the parameters (at peak / warmup_steps).
  return lambda count: base(count + 1)


def _schedule_from_one(t: ml_collections.ConfigDict) -> optax.Schedule:
  peak, floor = t.learning_rate, t.learning_rate * t.min_lr_ratio
  if t.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, t.warmup_steps, t.steps, end_value=floor)
  # WSD (Hu et al. 2024, MiniCPM): hold the peak, then decay linearly over the last fraction of steps,
  # so one run's stable phase can be branched into decays at several token counts.
  decay_steps = max(1, round(t.decay_fraction * t.steps))
  stable_steps = t.steps - t.warmup_steps - decay_steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, t.warmup_steps),
       optax.constant_schedule(peak),
       optax.linear_schedule(peak, floor, decay_steps)],
      boundaries=[t.warmup_steps, t.warmup_steps + max(stable_steps, 0)])


def short_run_warmup(steps: int, warmup_steps: int) -> int:
  """A warmup a run of `steps` steps can afford: at most a tenth of them (at least one, fewer than all),
  so that a short run does not spend most of its steps warming up."""
  return max(0, min(warmup_steps, steps - 1, max(1, steps // 10)))


def decay_mask(params):
  """Decay weight matrices and embedding tables; skip vectors (norm scales, biases)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(t)
  tx = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask))
  return tx, schedule
