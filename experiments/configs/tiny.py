"""A tiny Transfusion for tests and smoke runs on CPU.

Usage: --config experiments/configs/tiny.py[:unet]   (arg picks the image encoder)
"""

from tfusion import configlib


def get_config(arg="linear"):
  config = configlib.base_config()
  config.model.image.encoder = arg or "linear"
  config.optim.warmup_steps = 10
  config.optim.decay_steps = 1000
  config.optim.lr = 1e-3
  config.optim.end_lr = 1e-4
  return config
