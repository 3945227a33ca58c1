"""Learning-rate schedules and the weight-decay mask."""

import jax.numpy as jnp
import pytest

from sparse_lm import optim
from tests.conftest import tiny_config


def _rates(schedule_name):
  t = tiny_config().train
  t.update(schedule=schedule_name, steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1,
           decay_fraction=0.2)
  schedule = optim.learning_rate_schedule(t)
  return [float(schedule(count)) for count in range(100)]


@pytest.mark.parametrize('name', ['cosine', 'wsd'])
def test_warmup_reaches_peak_and_ends_at_floor(name):
  rates = _rates(name)
  assert rates[0] == pytest.approx(0.1)  # the first update already moves the parameters
  assert rates[9] == pytest.approx(1.0)
  assert rates[-1] == pytest.approx(0.1, abs=1e-6)
  assert all(a <= b + 1e-9 for a, b in zip(rates[:9], rates[1:10], strict=True))


def test_wsd_holds_the_peak_until_the_decay_phase():
  rates = _rates('wsd')
  assert all(r == pytest.approx(1.0) for r in rates[9:80])
  assert rates[90] < 1.0


def test_decay_skips_vectors():
  params = {'w': jnp.ones((3, 4)), 'scale': jnp.ones((4,)), 'embed': jnp.ones((5, 4))}
  assert optim.decay_mask(params) == {'w': True, 'scale': False, 'embed': True}
