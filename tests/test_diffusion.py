"""Noise schedules: the marginals q(x_t | x_0), time sampling, noise limiting, sampler steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion

N = 200_000


def test_cosine_schedule_shape():
  ab = diffusion.cosine_alpha_bars(1000)
  assert ab.shape == (1000,)
  assert np.all(np.diff(ab) < 0), "alpha_bar must decrease"
  assert ab[0] > 0.999 and ab[-1] < 1e-4
  # Nichol & Dhariwal: alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1+s) * pi/2)^2.
  f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(ab[499], f(500) / f(0), rtol=1e-6)


@pytest.mark.parametrize("objective", [diffusion.CosineDDPM(),
                                       diffusion.RectifiedFlow("uniform"),
                                       diffusion.RectifiedFlow("logit_normal")])
def test_noisy_marginals_match_the_schedule(objective):
  """For fixed x0 and t, x_t has the schedule's mean and variance; the target is as defined."""
  x0 = jnp.full((N, 1, 1, 1, 1), 0.7)
  t = jnp.full((N, 1), 0.6)
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  xt = np.asarray(objective.noisy(x0, noise, t)).ravel()
  if isinstance(objective, diffusion.CosineDDPM):
    ab = diffusion.cosine_alpha_bars(1000)[600]
    mean, std = np.sqrt(ab) * 0.7, np.sqrt(1 - ab)
    target = noise
  else:
    mean, std = 0.4 * 0.7, 0.6
    target = noise - x0
  assert abs(xt.mean() - mean) < 4 * std / np.sqrt(N)
  assert abs(xt.std() - std) < 0.01 * std
  np.testing.assert_allclose(objective.target(x0, noise, t), target)


def test_ddpm_time_sampling_is_uniform_over_steps_and_respects_noise_limiting():
  obj = diffusion.CosineDDPM()
  max_t = jnp.concatenate([jnp.ones(N // 2), jnp.full(N // 2, 0.5)])
  t = np.asarray(obj.sample_time(jax.random.PRNGKey(1), max_t))
  steps = np.round(t * 1000).astype(int)
  np.testing.assert_allclose(t * 1000, steps, atol=1e-3)  # integer steps
  full, limited = steps[: N // 2], steps[N // 2:]
  assert full.min() == 0 and full.max() == 999
  assert limited.min() == 0 and limited.max() == 499  # t < 500 for captioning examples
  expected = N / 2 / 1000
  chi2 = ((np.bincount(full, minlength=1000) - expected) ** 2 / expected).sum()
  assert chi2 < 999 + 5 * np.sqrt(2 * 999), "steps are not uniform over [0, 1000)"


def test_flow_time_sampling():
  uniform = diffusion.RectifiedFlow("uniform")
  t = np.asarray(uniform.sample_time(jax.random.PRNGKey(2), jnp.full(N, 0.5)))
  assert t.min() >= 0 and t.max() <= 0.5 and abs(t.mean() - 0.25) < 0.005
  logit = diffusion.RectifiedFlow("logit_normal")
  t = np.asarray(logit.sample_time(jax.random.PRNGKey(3), jnp.ones(N)))
  z = np.log(t / (1 - t))
  assert abs(z.mean()) < 0.02 and abs(z.std() - 1.0) < 0.02
  with pytest.raises(ValueError, match="time_sampling"):
    diffusion.RectifiedFlow("gaussian").sample_time(jax.random.PRNGKey(0), jnp.ones(3))


@pytest.mark.parametrize("objective,eta", [(diffusion.CosineDDPM(), 0.0),
                                           (diffusion.CosineDDPM(), 1.0),
                                           (diffusion.RectifiedFlow("uniform"), 0.0)])
def test_sampler_with_an_oracle_model_recovers_the_clean_latent(objective, eta):
  """With the true target as the model output, the reverse chain ends at x0."""
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((2, 1, 4, 4, 3)), jnp.float32)
  times = objective.sampling_times(20)
  eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  x = objective.noisy(x0, eps, jnp.full((2, 1), times[0]))
  key = jax.random.PRNGKey(0)
  for t, t_next in zip(times[:-1], times[1:]):
    # Oracle: the model's output is what training would regress on at (x, t).
    if isinstance(objective, diffusion.CosineDDPM):
      ab = objective.alpha_bars[int(round(t * 1000))]
      pred = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    else:
      pred = (x - x0) / t if t > 0 else jnp.zeros_like(x)
    key, sub = jax.random.split(key)
    x = objective.step(x, pred, t, t_next, jax.random.normal(sub, x.shape), eta=eta)
  np.testing.assert_allclose(x, x0, atol=1e-4)


def test_from_config_rejects_unknown_objective():
  from tfusion import configlib
  config = configlib.base_config()
  config.diffusion.objective = "edm"
  with pytest.raises(ValueError, match="config.diffusion.objective"):
    diffusion.from_config(config)


@pytest.mark.parametrize("objective,eta,steps", [(diffusion.CosineDDPM(), 1.0, 250),
                                                 (diffusion.CosineDDPM(), 0.0, 50),
                                                 (diffusion.RectifiedFlow("uniform"), 0.0, 50)])
def test_samplers_with_the_exact_denoiser_reproduce_the_data_distribution(objective, eta, steps):
  """Gaussian data has a closed-form optimal model; sampling with it must give back the data's
  mean and spread (catches wrong noise levels in ancestral steps, not only wrong means)."""
  mean, std = 0.7, 0.3
  times = objective.sampling_times(steps)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (20000, 1, 1, 1, 1))
  for t, t_next in zip(times[:-1], times[1:]):
    key, sub = jax.random.split(key)
    pred = diffusion.gaussian_optimal_prediction(objective, x, t, mean, std)
    x = objective.step(x, pred, t, t_next, jax.random.normal(sub, x.shape), eta=eta)
  assert abs(float(x.mean()) - mean) < 0.01
  assert abs(float(x.std()) - std) < 0.015  # 250 ancestral / 50 deterministic steps: ~2%
