"""Sliding-window attention: dense GQA where query `t` sees only keys `t - window < s <= t`."""

import ml_collections

from sparse_lm.attention import dense
from sparse_lm.errors import ConfigError


class Attention(dense.Attention):

  @staticmethod
  def defaults() -> dict:
    return {'window': 0}  # keys with t - window < s <= t; sliding_window needs it >= 1

  @staticmethod
  def tiny_config() -> dict:
    return {'window': 5}

  @staticmethod
  def attention_window(cfg: ml_collections.ConfigDict) -> int:
    if cfg.window < 1:
      raise ConfigError(f'model.window={cfg.window}: sliding_window attention needs a window >= 1')
    return cfg.window

  @classmethod
  def reach(cls, cfg: ml_collections.ConfigDict) -> int:
    return cls.attention_window(cfg)
