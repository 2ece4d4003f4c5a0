"""The optimizer: AdamW, linear warmup then cosine decay to a floor, global-norm clipping.

Paper defaults (PAPER.md): b1=0.9, b2=0.95, eps=1e-8, lr 3e-4 with 4000 warmup steps and cosine
decay to 1.5e-5, weight decay 0.1, clip 1.0. Weight decay skips norm scales, biases and
embeddings (token, patch position) unless `config.optim.decay_norms_and_embeddings`.
"""

import flax
import jax
import jax.numpy as jnp
import optax

_NO_DECAY_NAMES = ("scale", "bias", "embedding")


def learning_rate_schedule(optim_config):
  """step -> learning rate: 0 -> lr linearly over warmup_steps, cosine to end_lr at decay_steps.

  Branches (see configlib): read at step + schedule_offset; with cooldown_steps = N > 0, from
  step cooldown_start = C on the lr decays from its value at C to end_lr over N steps
  (linear or cosine) and stays there.
  """
  c = optim_config
  if c.decay_steps <= c.warmup_steps:
    raise ValueError(f"config.optim.decay_steps={c.decay_steps} must exceed "
                     f"config.optim.warmup_steps={c.warmup_steps}")
  base = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=c.warmup_steps, decay_steps=c.decay_steps,
      end_value=c.end_lr)
  # Stored configs of older runs lack the branch keys (eval/generate rebuild the optimizer).
  offset = c.get("schedule_offset", 0)
  steps, start = c.get("cooldown_steps", 0), c.get("cooldown_start", 0)
  shape = c.get("cooldown_shape", "linear")
  if shape not in ("linear", "cosine"):
    raise ValueError(f"config.optim.cooldown_shape must be 'linear' or 'cosine', got {shape!r}")
  if offset < 0 or steps < 0 or start < 0:
    raise ValueError("config.optim.schedule_offset, cooldown_steps and cooldown_start must be "
                     f">= 0, got {offset}, {steps}, {start}")
  if not offset and not steps:
    return base

  def schedule(step):
    lr = base(step + offset)
    if not steps:
      return lr
    begin = base(start + offset)
    floor = jnp.minimum(c.end_lr, begin)
    frac = jnp.clip((step - start) / steps, 0.0, 1.0)
    left = 1.0 - frac if shape == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step >= start, floor + (begin - floor) * left, lr)

  return schedule


def weight_decay_mask(params):
  """True for parameters that get weight decay (matrices), False for norms/biases/embeddings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  mask = {path: not any(part in _NO_DECAY_NAMES for part in path) for path in flat}
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(optim_config):
  """Returns (optax.GradientTransformation, schedule)."""
  c = optim_config
  schedule = learning_rate_schedule(c)
  mask = None if c.decay_norms_and_embeddings else weight_decay_mask
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask),
  )
  return tx, schedule


def global_norm(tree):
  return optax.global_norm(jax.tree.leaves(tree))
