"""`ConfigError` and the checks every config section shares; each failure is one line naming the key,
the value and what is allowed. Variants import these, so this module imports nothing of the project."""

from collections.abc import Iterable, Mapping


class ConfigError(ValueError):
  """A config value that cannot run; the message is one line naming the key."""


def require_choice(key: str, value, allowed: Iterable) -> None:
  if value not in allowed:
    raise ConfigError(f'{key}={value!r} is not one of the allowed values {sorted(allowed)}')


def require_positive(cfg: Mapping, prefix: str, keys: Iterable[str], why: str = '') -> None:
  """Each `cfg[key]` is an integer >= 1; `why` is appended to the message (what the value means)."""
  for key in keys:
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ConfigError(f'{prefix}.{key}={cfg[key]!r} must be a positive integer{why}')
