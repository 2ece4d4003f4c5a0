"""Diffusion objectives on image latents: the noise schedule, training targets and sampler steps.

Time is one continuous number t in [0, 1] everywhere (0 = clean, 1 = pure noise); the model's
timestep embedding sees t. Two objectives:

* `CosineDDPM` (paper default): the cosine alpha-bar schedule of Nichol & Dhariwal with T=1000
  discrete steps; t is drawn as an integer step i in [0, T) and fed as i / T; the model
  predicts the noise epsilon.
* `RectifiedFlow`: x_t = (1 - t) x0 + t eps, the model predicts the velocity eps - x0; t is
  drawn uniformly or logit-normally.

Noise limiting (captioning examples): times are drawn below `max_t` (per image, from the batch
key `image_max_t`), i.e. t <= 500 of 1000 steps for max_t = 0.5.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alpha_bars(num_steps, s=0.008, max_beta=0.999):
  """alpha_bar after steps 1..T of the cosine schedule (betas clipped at `max_beta`). -> [T]."""
  f = lambda i: math.cos((i / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)])
  return np.cumprod(1.0 - betas)


@dataclasses.dataclass(frozen=True)
class CosineDDPM:
  """Discrete-time DDPM with the cosine schedule and epsilon prediction."""
  num_steps: int = 1000

  @property
  def alpha_bars(self):
    return jnp.asarray(cosine_alpha_bars(self.num_steps), jnp.float32)

  def _alpha_bar(self, t):
    idx = jnp.clip(jnp.round(t * self.num_steps).astype(jnp.int32), 0, self.num_steps - 1)
    return self.alpha_bars[idx]

  def sample_time(self, rng, max_t):
    """Integer step i uniform in [0, ceil(max_t * T)), returned as i / T. max_t: [...] -> [...]."""
    limit = jnp.maximum(jnp.ceil(max_t * self.num_steps), 1.0)
    i = jnp.floor(jax.random.uniform(rng, max_t.shape) * limit)
    return jnp.minimum(i, self.num_steps - 1) / self.num_steps

  def noisy(self, x0, noise, t):
    """x_t = sqrt(ab) x0 + sqrt(1 - ab) eps. x0, noise: [B, M, h, w, c]; t: [B, M]."""
    ab = self._alpha_bar(t)[..., None, None, None]
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise

  def target(self, x0, noise, t):
    del x0, t
    return noise

  def predict_x0_and_noise(self, x_t, prediction, t):
    """Model output (epsilon) at x_t -> (x0 estimate, epsilon estimate)."""
    ab = self._alpha_bar(t)[..., None, None, None]
    x0 = (x_t - jnp.sqrt(1.0 - ab) * prediction) / jnp.sqrt(ab)
    return x0, prediction

  def sampling_times(self, num_steps):
    """num_steps evenly spaced training steps from T-1 down to 0 (as t = i / T), then 0 -> [S+1]."""
    steps = np.linspace(self.num_steps - 1, 0, num_steps).round()
    return np.append(steps / self.num_steps, -1.0).astype(np.float32)  # -1 marks "clean"

  def step(self, x_t, prediction, t, t_next, noise, *, eta=1.0, clip_x0=None):
    """One reverse step from time t to t_next < t (t_next = -1 means return the clean estimate).

    eta = 1 is DDPM ancestral sampling (with respaced steps); eta = 0 is deterministic DDIM.
    clip_x0: optional bound c on the clean estimate (x0 in [-c, c], the noise estimate made
    consistent with it). At the first steps alpha_bar is tiny (2e-9 at step 999), so an error
    d in the predicted noise moves x0 by d / sqrt(alpha_bar); clipping bounds the damage.
    Shapes: x_t, prediction, noise [B, M, h, w, c]; t, t_next scalars or [B, M].
    """
    x0, eps = self.predict_x0_and_noise(x_t, prediction, t)
    if clip_x0 is not None:
      ab_t = self._alpha_bar(t)[..., None, None, None]
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    ab = self._alpha_bar(t)
    ab_next = jnp.where(t_next < 0, 1.0, self._alpha_bar(jnp.maximum(t_next, 0.0)))
    sigma = eta * jnp.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
    expand = lambda a: jnp.broadcast_to(a, jnp.broadcast_shapes(jnp.shape(a), jnp.shape(t)))[
        ..., None, None, None]
    ab_next, sigma = expand(ab_next), expand(sigma)
    direction = jnp.sqrt(jnp.maximum(1 - ab_next - sigma ** 2, 0.0))
    return jnp.sqrt(ab_next) * x0 + direction * eps + sigma * noise


@dataclasses.dataclass(frozen=True)
class RectifiedFlow:
  """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0."""
  time_sampling: str = "logit_normal"  # or "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0

  def sample_time(self, rng, max_t):
    if self.time_sampling == "uniform":
      u = jax.random.uniform(rng, max_t.shape)
    elif self.time_sampling == "logit_normal":
      u = jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(rng, max_t.shape))
    else:
      raise ValueError(f"config.diffusion.time_sampling must be 'uniform' or 'logit_normal', "
                       f"got {self.time_sampling!r}")
    return u * max_t

  def noisy(self, x0, noise, t):
    t = t[..., None, None, None]
    return (1.0 - t) * x0 + t * noise

  def target(self, x0, noise, t):
    del t
    return noise - x0

  def predict_x0_and_noise(self, x_t, prediction, t):
    t = jnp.asarray(t)[..., None, None, None]
    return x_t - t * prediction, x_t + (1.0 - t) * prediction

  def sampling_times(self, num_steps):
    """Uniform grid 1 -> 0 with num_steps intervals -> [S+1]."""
    return np.linspace(1.0, 0.0, num_steps + 1).astype(np.float32)

  def step(self, x_t, prediction, t, t_next, noise=None, *, eta=0.0):
    """Euler step of the flow ODE dx/dt = v from t to t_next."""
    del noise, eta
    dt = jnp.asarray(t_next - t)
    return x_t + dt[..., None, None, None] * prediction

  def heun_step(self, x_t, prediction, prediction_at_euler, t, t_next):
    """Heun (trapezoidal) step from t to t_next: second order, two model calls per step.

    `prediction_at_euler` is the velocity the model gives at (`step(x_t, prediction, t,
    t_next)`, t_next); the step averages it with `prediction`. Shapes as `step`.
    """
    dt = jnp.asarray(t_next - t)
    return x_t + dt[..., None, None, None] * 0.5 * (prediction + prediction_at_euler)


def from_config(config):
  """Builds the objective named by `config.diffusion.objective` ('ddpm' | 'flow')."""
  d = config.diffusion
  if d.objective == "ddpm":
    return CosineDDPM(num_steps=d.num_train_steps)
  if d.objective == "flow":
    return RectifiedFlow(time_sampling=d.time_sampling, logit_mean=d.logit_mean,
                         logit_std=d.logit_std)
  raise ValueError(f"config.diffusion.objective must be 'ddpm' or 'flow', got {d.objective!r}")
