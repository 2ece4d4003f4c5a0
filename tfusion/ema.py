"""An exponential moving average of the parameters (config.train.ema_decay), for eval/sampling.

Kept in the train state as `ema_params` (sharded like the params, saved and restored with
them) when ema_decay > 0. The decay ramps up, min(ema_decay, (1 + step) / (10 + step)), so
the average is not dominated by the random init in a short run (at step 100 it is 0.92).
Steps whose update was skipped (non-finite loss) leave it unchanged.

Resuming: a checkpoint saved without EMA restores into a config with EMA (the average starts
from the restored params, with a warning); one saved with EMA restores into a config without
(the average is dropped from later checkpoints, with a warning). Eval and generate use the
EMA weights when a checkpoint has them (`config.eval.weights` / `--weights`: auto | ema | raw).
"""

import jax
import jax.numpy as jnp

KEY = "ema_params"
WEIGHTS = ("auto", "ema", "raw")


def check_decay(decay):
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.train.ema_decay must be in [0, 1) (0: no EMA), got {decay!r}")


def enabled(config):
  decay = config.train.get("ema_decay", 0.0)
  check_decay(decay)
  return decay > 0


def init(params):
  """The average's first value: a copy of the params (a new buffer: the state is donated)."""
  return jax.tree.map(jnp.copy, params)


def decay_at(decay, step):
  """The decay used for the update after `step` (int32 scalar): ramped up from 0.1."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update(ema_params, params, decay, step):
  """ema <- d * ema + (1 - d) * params, d = decay_at(decay, step); in the params' dtype."""
  d = decay_at(decay, step)
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)


def check_weights(choice, where="config.eval.weights"):
  if choice not in WEIGHTS:
    raise ValueError(f"{where} must be one of {', '.join(WEIGHTS)}, got {choice!r}")
