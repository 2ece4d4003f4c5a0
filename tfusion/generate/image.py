"""Image sampling after <boi> with a cached prefix and classifier-free guidance.

Each denoising step runs only the image's N positions against the cached context (see
`context.predict_image`). With guidance the batch holds 2B rows: the B conditional contexts
and B unconditional ones (the same documents without their text, i.e. <bos> <boi>), and the
prediction is  cond + (scale - 1) * (cond - uncond)  (= uncond + scale * (cond - uncond));
written this way scale 1 returns the conditional prediction exactly.

DDPM/DDIM bound the clean estimate and pick their steps as the objective says
(config.diffusion, overridden per call by `sampling_objective`): unbounded, a trained model's
small error at the noisiest step blows the latents up.

Noise is per sample: sample i starts from normal(fold_in(key_i, 0)) and step s draws
normal(fold_in(key_i, s + 1)), so an image does not depend on the batch it was drawn in.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tfusion import diffusion
from tfusion.generate import context as context_lib


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  objective: str  # the config.diffusion.objective it needs
  eta: float  # DDPM/DDIM stochasticity (unused for flow)
  default_steps: int


SAMPLERS = {
    "ddpm": SamplerSpec("ddpm", 1.0, 250),  # ancestral, the paper's 250 steps
    "ddim": SamplerSpec("ddpm", 0.0, 50),  # deterministic, fewer steps
    "euler": SamplerSpec("flow", 0.0, 50),  # flow ODE, one model call per step
    "heun": SamplerSpec("flow", 0.0, 25),  # flow ODE, two model calls per step (last: one)
}
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "euler"}


def resolve_sampler(name, objective_name, steps, num_train_steps=None, clip_x0=None):
  """Checks a sampler choice against the model's objective. Returns (name, steps).

  `name=None` picks the objective's default and `steps=None` the sampler's default.
  """
  if name is None:
    if objective_name not in DEFAULT_SAMPLER:
      raise ValueError(f"config.diffusion.objective {objective_name!r} has no sampler "
                       f"(known objectives: {list(DEFAULT_SAMPLER)})")
    name = DEFAULT_SAMPLER[objective_name]
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; choose from {list(SAMPLERS)}")
  spec = SAMPLERS[name]
  if spec.objective != objective_name:
    usable = [n for n, s in SAMPLERS.items() if s.objective == objective_name]
    raise ValueError(f"sampler {name!r} is for the {spec.objective!r} objective but the model was "
                     f"trained with config.diffusion.objective={objective_name!r}; use one of "
                     f"{usable}")
  steps = spec.default_steps if steps is None else int(steps)
  if steps < 1:
    raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
  if clip_x0 is not None and (objective_name != "ddpm" or not clip_x0 > 0):
    raise ValueError(f"clip_x0={clip_x0}: a positive bound, for the ddpm and ddim samplers only")
  if num_train_steps is not None and objective_name == "ddpm" and steps > num_train_steps:
    raise ValueError(f"{steps} sampling steps exceed the {num_train_steps} DDPM training steps "
                     "(config.diffusion.num_train_steps)")
  return name, steps


def sampling_objective(config, overrides=None, where="--"):
  """The run's objective (config.diffusion) with DDPM sampler settings overridden.

  overrides: {x0_threshold, clip_x0, threshold_percentile, timestep_spacing: value or None}
  (None keeps config.diffusion's). A bound given while thresholding is off turns static
  clipping on. Errors name the setting as `where + key` (`--clip_x0`, `config.eval.clip_x0`).
  """
  objective = diffusion.from_config(config)
  overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
  unknown = sorted(set(overrides) - set(diffusion.SAMPLING_KEYS))
  if unknown:
    raise ValueError(f"unknown sampler settings {unknown}; known: {list(diffusion.SAMPLING_KEYS)}")
  if not overrides:
    return objective
  if not isinstance(objective, diffusion.CosineDDPM):
    raise ValueError(f"{where}{next(iter(overrides))} is a setting of the ddpm and ddim samplers; "
                     f"the model was trained with config.diffusion.objective="
                     f"{config.diffusion.objective!r}")
  diffusion.check_sampling(overrides, where)
  if "clip_x0" in overrides and "x0_threshold" not in overrides \
      and objective.x0_threshold == "none":
    overrides["x0_threshold"] = "static"
  return dataclasses.replace(objective, **overrides)


def initial_noise(keys, shape):
  """Per-sample starting noise: keys [B, 2] -> float32 [B, *shape]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)


def step_noise(keys, step, shape):
  """Per-sample noise of denoising step `step` (0-based): -> float32 [B, *shape]."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step + 1), shape))(keys)


def guide(cond, uncond, scale):
  """Classifier-free guidance; scale 1 gives `cond` exactly."""
  return cond + (scale - 1.0) * (cond - uncond)


def sampler_update(objective, sampler, x, prediction, t, t_next, noise, predict_fn, clip_x0=None):
  """One step of `sampler` from t to t_next; `predict_fn(x, t)` is needed by Heun only.

  clip_x0 (DDPM/DDIM only): overrides the objective's bound on the clean estimate (the
  objective carries its thresholding and spacing, see `sampling_objective`, `CosineDDPM.step`).
  """
  if sampler in ("ddpm", "ddim"):
    return objective.step(x, prediction, t, t_next, noise, eta=SAMPLERS[sampler].eta,
                          clip_x0=clip_x0)
  if sampler == "euler":
    return objective.step(x, prediction, t, t_next)
  if sampler == "heun":
    x_euler = objective.step(x, prediction, t, t_next)
    return objective.heun_step(x, prediction, predict_fn(x_euler, t_next), t, t_next)
  raise ValueError(f"unknown sampler {sampler!r}; choose from {list(SAMPLERS)}")


def rule_of_step(sampler, step, num_steps):
  """The update used at `step` (0-based) of `num_steps`.

  As EDM (Karras et al. 2022, Alg. 1), Heun's last step, to t = 0, is an Euler step: the
  model is never asked about t = 0 (rarely drawn in training); S steps = 2S - 1 model calls.
  """
  return "euler" if sampler == "heun" and step == num_steps - 1 else sampler


def denoising_loop(predict, keys, times, *, objective, sampler, latent_shape, clip_x0=None):
  """Noise -> latents with `predict(x [B, h, w, c], t) -> model output` (jit-able).

  times: float32 [S + 1] sampling times. The one loop behind cached and reference sampling.
  """
  num_steps = times.shape[0] - 1

  def body(rule, i, x):
    t, t_next = times[i], times[i + 1]
    noise = step_noise(keys, i, latent_shape) if rule == "ddpm" else jnp.zeros_like(x)
    return sampler_update(objective, rule, x, predict(x, t), t, t_next, noise, predict, clip_x0)

  x = initial_noise(keys, latent_shape)
  last_rule = rule_of_step(sampler, num_steps - 1, num_steps)
  x = jax.lax.fori_loop(0, num_steps - 1, functools.partial(body, sampler), x)
  return body(last_rule, num_steps - 1, x)


def sample(module, ctx, keys, active, times, guidance_scale, *, objective, sampler, guided,
           latent_shape, intra_image, clip_x0=None):
  """Draws one image per row after the context (runs inside `Transfusion.apply`).

  Args:
    module: the bound Transfusion module.
    ctx: cursor at the image's first slot; B rows, or 2B with `guided` (conditional rows
      first, then their unconditional twins).
    keys: [B, 2] per-sample PRNG keys. active: bool [B], rows that draw an image.
    times: float32 [S + 1] the objective's sampling times (first = noise, last = clean).
    guidance_scale: float scalar.
    objective: a tfusion.diffusion objective; sampler: a SAMPLERS name; guided: static.
    latent_shape: (h, w, c). clip_x0: see `sampler_update`.
  Returns:
    float32 [B, h, w, c] latents.
  """
  b = keys.shape[0]
  row_active = jnp.concatenate([active, active]) if guided else active

  def predict(x, t):
    x_in = jnp.concatenate([x, x]) if guided else x
    t_in = jnp.full((x_in.shape[0],), t, jnp.float32)
    out = context_lib.predict_image(module, ctx, x_in, t_in, row_active, intra_image=intra_image)
    return guide(out[:b], out[b:], guidance_scale) if guided else out

  return denoising_loop(predict, keys, times, objective=objective, sampler=sampler,
                        latent_shape=latent_shape, clip_x0=clip_x0)
