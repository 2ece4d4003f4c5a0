"""Diffusion objectives on image latents: the noise schedule, training targets and sampler steps.

Time is one continuous number t in [0, 1] everywhere (0 = clean, 1 = pure noise); the model's
timestep embedding sees t. Two objectives:

* `CosineDDPM` (paper default): the cosine alpha-bar schedule of Nichol & Dhariwal with T=1000
  discrete steps; t is drawn as an integer step i in [0, T) and fed as i / T; the model
  predicts the noise epsilon (the paper), or v or x0; optional min-SNR loss weighting and
  zero-terminal-SNR rescaling. Its samplers (ancestral DDPM, DDIM) bound the clean estimate
  (static clipping or dynamic thresholding) and visit linspace / leading / trailing steps.
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


PREDICTIONS = ("eps", "v", "x0")  # what a DDPM model outputs
WEIGHTINGS = ("none", "min_snr")  # per-image weight of the DDPM loss
THRESHOLDS = ("none", "static", "dynamic")  # how DDPM samplers bound the clean estimate
SPACINGS = ("linspace", "leading", "trailing")  # which training steps DDPM samplers visit


def cosine_alpha_bars(num_steps, s=0.008, max_beta=0.999):
  """alpha_bar after steps 1..T of the cosine schedule (betas clipped at `max_beta`). -> [T]."""
  f = lambda i: math.cos((i / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)])
  return np.cumprod(1.0 - betas)


def rescale_zero_terminal_snr(alpha_bars):
  """Lin et al. 2024, Alg. 1: shift and scale sqrt(alpha_bar) so the last step is pure noise.

  The first step keeps its value; the cosine schedule ends at alpha_bar 2.4e-9 (beta clipped
  at 0.999), so this changes little but makes the training's last step SNR exactly 0. -> [T].
  """
  sqrt_ab = np.sqrt(np.asarray(alpha_bars, np.float64))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  return ((sqrt_ab - last) * first / (first - last)) ** 2


def spaced_steps(num_train_steps, num_steps, spacing):
  """Training steps (0-based, decreasing) visited by a sampler of `num_steps` steps. -> [S].

  As Lin et al. 2024, Table 2 (their 1-based steps minus one), T = 1000, S = 50:
  linspace 999, 979, ..., 0 (rounded); leading 980, 960, ..., 0; trailing 999, 979, ..., 19.
  Leading never starts at the noisiest step; trailing starts there and steps evenly.
  """
  t, s = num_train_steps, num_steps
  if spacing == "linspace":
    steps = np.linspace(t - 1, 0, s).round()
  elif spacing == "leading":
    steps = np.floor(np.arange(s) * t / s)[::-1]
  elif spacing == "trailing":
    steps = np.round(t - np.arange(s) * t / s) - 1
  else:
    raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
  return steps


def threshold_x0(x0, mode, bound, percentile=0.995):
  """Bounds a clean-latent estimate. x0: [..., h, w, c] -> same shape.

  static: clip to [-bound, bound]. dynamic (Imagen, Saharia et al. 2022): per sample,
  s = max(percentile of |x0|, bound); clip to [-s, s] and scale by bound / s. Imagen's bound
  is 1 for pixels in [-1, 1]; normalised latents (unit variance) need a few standard
  deviations, so `bound` plays that part: an estimate inside it is only clipped, a saturated
  one is shrunk as a whole rather than flattened at the bound.
  """
  if mode == "none":
    return x0
  if mode == "static":
    return jnp.clip(x0, -bound, bound)
  if mode == "dynamic":
    s = jnp.quantile(jnp.abs(x0), percentile, axis=(-3, -2, -1), keepdims=True)
    s = jnp.maximum(s, bound)
    return jnp.clip(x0, -s, s) * (bound / s)
  raise ValueError(f"x0 threshold must be one of {THRESHOLDS}, got {mode!r}")


def check_sampling(settings, where):
  """Raises ValueError naming the key (`where` + key) for a bad DDPM sampler setting.

  settings: dict with any of x0_threshold, clip_x0, threshold_percentile, timestep_spacing.
  """
  mode = settings.get("x0_threshold")
  if mode is not None and mode not in THRESHOLDS:
    raise ValueError(f"{where}x0_threshold must be one of {THRESHOLDS}, got {mode!r}")
  bound = settings.get("clip_x0")
  if bound is not None and not bound > 0:
    raise ValueError(f"{where}clip_x0 must be a positive bound on the clean latent, got {bound} "
                     f"(to turn bounding off set {where}x0_threshold='none')")
  p = settings.get("threshold_percentile")
  if p is not None and not 0 < p <= 1:
    raise ValueError(f"{where}threshold_percentile must be in (0, 1] (e.g. 0.995), got {p}")
  spacing = settings.get("timestep_spacing")
  if spacing is not None and spacing not in SPACINGS:
    raise ValueError(f"{where}timestep_spacing must be one of {SPACINGS}, got {spacing!r}")


@dataclasses.dataclass(frozen=True)
class CosineDDPM:
  """Discrete-time DDPM with the cosine schedule.

  Training: `prediction` is what the model outputs, eps (the paper), v = sqrt(ab) eps -
  sqrt(1 - ab) x0 (Salimans & Ho 2022) or x0; `loss_weighting` 'min_snr' weights each image
  by min(SNR, gamma) expressed for that target (Hang et al. 2023). `zero_terminal_snr`
  rescales the schedule so the last step is pure noise (needs v or x0: eps says nothing about
  x0 at SNR 0).
  Sampling: `x0_threshold` / `clip_x0` / `threshold_percentile` bound the clean estimate at
  each step and `timestep_spacing` picks the visited steps (see `step`, `spaced_steps`).
  The dataclass defaults are the unguarded textbook sampler; config.diffusion's turn
  thresholding on.
  """
  num_steps: int = 1000
  prediction: str = "eps"
  zero_terminal_snr: bool = False
  loss_weighting: str = "none"
  min_snr_gamma: float = 5.0
  x0_threshold: str = "none"
  clip_x0: float = 3.0
  threshold_percentile: float = 0.995
  timestep_spacing: str = "linspace"

  @property
  def alpha_bars(self):
    ab = cosine_alpha_bars(self.num_steps)
    if self.zero_terminal_snr:
      ab = rescale_zero_terminal_snr(ab)
    return jnp.asarray(ab, jnp.float32)

  def _alpha_bar(self, t):
    idx = jnp.clip(jnp.round(t * self.num_steps).astype(jnp.int32), 0, self.num_steps - 1)
    return self.alpha_bars[idx]

  def snr(self, t):
    """alpha_bar / (1 - alpha_bar) at times t: [...] -> [...]."""
    ab = self._alpha_bar(t)
    return ab / (1.0 - ab)

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
    """The regression target of `prediction`. x0, noise: [B, M, h, w, c]; t: [B, M]."""
    if self.prediction == "eps":
      return noise
    if self.prediction == "x0":
      return x0
    ab = self._alpha_bar(t)[..., None, None, None]
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0  # v

  def loss_weight(self, t):
    """Per-image weight of the squared error at times t: [B, M] -> [B, M].

    min-SNR-gamma weights the x0 error by min(SNR, gamma); the eps error equals SNR times it
    and the v error (SNR + 1) times it, hence the three forms.
    """
    if self.loss_weighting == "none":
      return jnp.ones_like(t)
    snr = self.snr(t)
    clipped = jnp.minimum(snr, self.min_snr_gamma)
    if self.prediction == "eps":
      return jnp.minimum(1.0, self.min_snr_gamma / snr)  # = clipped / snr, and 1 at SNR 0
    if self.prediction == "v":
      return clipped / (snr + 1.0)
    return clipped

  def predict_x0_and_noise(self, x_t, prediction, t):
    """Model output at x_t -> (x0 estimate, epsilon estimate), for each target.

    x_t, prediction: [B, ..., h, w, c]; t: scalar or the leading axes.
    """
    ab = jnp.asarray(self._alpha_bar(t))[..., None, None, None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    if self.prediction == "eps":
      return (x_t - s * prediction) / a, prediction
    if self.prediction == "v":
      return a * x_t - s * prediction, s * x_t + a * prediction
    return prediction, (x_t - a * prediction) / s  # x0 (s > 0: alpha_bar < 1 at every step)

  def sampling_times(self, num_steps):
    """Visited steps as t = i / T (`spaced_steps` with `timestep_spacing`), then -1 -> [S+1]."""
    steps = spaced_steps(self.num_steps, num_steps, self.timestep_spacing)
    return np.append(steps / self.num_steps, -1.0).astype(np.float32)  # -1 marks "clean"

  def step(self, x_t, prediction, t, t_next, noise, *, eta=1.0, clip_x0=None):
    """One reverse step from time t to t_next < t (t_next = -1 means return the clean estimate).

    eta = 1 is DDPM ancestral sampling (with respaced steps); eta = 0 is deterministic DDIM.
    The clean estimate is bounded by `x0_threshold` (`threshold_x0`) and the noise estimate
    made consistent with it. Why: at the first steps alpha_bar is tiny (2e-9 at step 999), so
    an error d in a predicted eps moves x0 by d / sqrt(alpha_bar); a trained model's small
    error there saturates the latents (RMS ~3000 measured) unless bounded.
    clip_x0: overrides the bound (and turns static clipping on if thresholding is off).
    Shapes: x_t, prediction, noise [B, M, h, w, c]; t, t_next scalars or [B, M].
    """
    x0, eps = self.predict_x0_and_noise(x_t, prediction, t)
    mode, bound = self.x0_threshold, self.clip_x0
    if clip_x0 is not None:
      mode, bound = ("static" if mode == "none" else mode), clip_x0
    if mode != "none":
      ab_t = jnp.asarray(self._alpha_bar(t))[..., None, None, None]
      x0 = threshold_x0(x0, mode, bound, self.threshold_percentile)
      eps = (x_t - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1.0 - ab_t)
    ab = self._alpha_bar(t)
    ab_next = jnp.where(t_next < 0, 1.0, self._alpha_bar(jnp.maximum(t_next, 0.0)))
    sigma = eta * jnp.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
    expand = lambda a: jnp.broadcast_to(a, jnp.broadcast_shapes(jnp.shape(a), jnp.shape(t)))[
        ..., None, None, None]
    ab_next, sigma = expand(ab_next), expand(sigma)
    direction = jnp.sqrt(jnp.maximum(1 - ab_next - sigma ** 2, 0.0))
    return jnp.sqrt(ab_next) * x0 + direction * eps + sigma * noise

  def sampling_settings(self):
    """The sampler settings to record with results (dict of plain values)."""
    out = {"timestep_spacing": self.timestep_spacing, "x0_threshold": self.x0_threshold}
    if self.x0_threshold != "none":
      out["clip_x0"] = float(self.clip_x0)
    if self.x0_threshold == "dynamic":
      out["threshold_percentile"] = float(self.threshold_percentile)
    return out


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

  def sampling_settings(self):
    """Flow samplers take no thresholding or spacing settings."""
    return {}


SAMPLING_KEYS = ("x0_threshold", "clip_x0", "threshold_percentile", "timestep_spacing")


def check_config(d):
  """Validates `config.diffusion` (d) before anything is built: ValueError naming the key."""
  if d.objective not in ("ddpm", "flow"):
    raise ValueError(f"config.diffusion.objective must be 'ddpm' or 'flow', got {d.objective!r}")
  prediction = d.get("prediction", "eps")
  weighting = d.get("loss_weighting", "none")
  if prediction not in PREDICTIONS:
    raise ValueError(f"config.diffusion.prediction must be one of {PREDICTIONS}, got "
                     f"{prediction!r}")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"config.diffusion.loss_weighting must be one of {WEIGHTINGS}, got "
                     f"{weighting!r}")
  if weighting == "min_snr" and not d.get("min_snr_gamma", 5.0) > 0:
    raise ValueError(f"config.diffusion.min_snr_gamma must be > 0, got {d.min_snr_gamma}")
  check_sampling({k: d[k] for k in SAMPLING_KEYS if k in d}, "config.diffusion.")
  if d.objective == "flow":
    # The flow predicts the velocity eps - x0 under its own linear path; its x0 estimate
    # x_t - t v is not amplified at t = 1, and t = 1 is already pure noise.
    for key, default in (("prediction", "eps"), ("loss_weighting", "none"),
                         ("zero_terminal_snr", False)):
      if d.get(key, default) != default:
        raise ValueError(f"config.diffusion.{key}={d[key]!r} is for objective 'ddpm'; the flow "
                         "objective predicts the velocity eps - x0 (leave the key at "
                         f"{default!r})")
  elif d.get("zero_terminal_snr", False) and prediction == "eps":
    raise ValueError("config.diffusion.zero_terminal_snr=True needs config.diffusion.prediction "
                     "'v' or 'x0': at SNR 0 an eps prediction says nothing about the image "
                     "(Lin et al. 2024)")


def gaussian_optimal_prediction(objective, x, t, mean, std):
  """The exact model for data x0 ~ N(mean, std^2) per coordinate: E[target | x_t = x].

  A closed-form reference for samplers (tests, benchmarks/sampler_rms.py): sampling with it
  must give back the data's mean and spread. The target is the objective's own: eps, v or x0
  for CosineDDPM (its `prediction`), the velocity eps - x0 for RectifiedFlow.
  Shapes: x any; t broadcastable to x (a scalar or [B, M] with trailing axes added by caller).
  """
  if isinstance(objective, CosineDDPM):
    ab = objective._alpha_bar(jnp.asarray(t, jnp.float32))
    a, b = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
  else:
    a, b = 1.0 - t, t
  var = a * a * std * std + b * b
  eps = b * (x - a * mean) / var
  x0 = mean + a * std * std * (x - a * mean) / var
  if not isinstance(objective, CosineDDPM):
    return eps - x0
  return {"eps": eps, "v": a * eps - b * x0, "x0": x0}[objective.prediction]


def from_config(config):
  """Builds the objective named by `config.diffusion.objective` ('ddpm' | 'flow'), checked.

  A DDPM objective carries the sampler defaults of config.diffusion (callers override them
  with `dataclasses.replace`, see tfusion.generate.image.sampling_objective).
  """
  from tfusion import configlib  # the defaults of keys older run configs lack
  d = config.diffusion
  check_config(d)
  if d.objective == "ddpm":
    defaults = configlib.base_config().diffusion
    fields = {k: d.get(k, defaults[k]) for k in ("prediction", "zero_terminal_snr",
                                                 "loss_weighting", "min_snr_gamma",
                                                 *SAMPLING_KEYS)}
    return CosineDDPM(num_steps=d.num_train_steps, **fields)
  return RectifiedFlow(time_sampling=d.time_sampling, logit_mean=d.logit_mean,
                       logit_std=d.logit_std)
