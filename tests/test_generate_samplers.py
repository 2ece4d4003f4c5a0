"""Sampler choices and the flow ODE solvers against a closed-form flow (no model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import diffusion
from tfusion.generate import image as image_lib

MU, S = 0.7, 0.3  # data x0 ~ N(MU, S^2) per coordinate


def exact_velocity(x, t):
  """E[eps - x0 | x_t = x] for Gaussian data under x_t = (1 - t) x0 + t eps."""
  var = (1 - t) ** 2 * S ** 2 + t ** 2
  centred = x - (1 - t) * MU
  return (t / var) * centred - (MU + (1 - t) * S ** 2 / var * centred)


def solve(sampler, steps, z):
  flow = diffusion.RectifiedFlow("uniform")
  times = flow.sampling_times(steps)
  x = z
  for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
    x = image_lib.sampler_update(flow, image_lib.rule_of_step(sampler, i, steps), x,
                                 exact_velocity(x, t), t, t_next, jnp.zeros_like(x),
                                 exact_velocity)
  return np.asarray(x)


def test_heun_is_second_order_and_beats_euler():
  """The flow ODE maps noise z to MU + S z exactly; Heun's error falls 4x per halved step."""
  z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1, 3, 3, 2)), jnp.float32)
  exact = MU + S * np.asarray(z)
  err = lambda sampler, n: np.abs(solve(sampler, n, z) - exact).max()
  heun = [err("heun", n) for n in (8, 16, 32)]
  euler = [err("euler", n) for n in (8, 16, 32)]
  for coarse, fine in zip(heun, heun[1:]):
    assert 3.0 < coarse / fine < 5.0, heun
  for coarse, fine in zip(euler, euler[1:]):
    assert 1.6 < coarse / fine < 2.5, euler
  # About the same number of model calls (Heun 16 steps = 31, Euler 32): Heun is closer.
  assert heun[1] < euler[2] / 2


def test_flow_heun_step_is_the_trapezoid_rule():
  flow = diffusion.RectifiedFlow()
  shape = (1, 1, 2, 2, 1)
  x, v1, v2 = jnp.ones(shape), jnp.full(shape, 2.0), jnp.full(shape, 4.0)
  np.testing.assert_allclose(flow.heun_step(x, v1, v2, 1.0, 0.75), 1.0 - 0.25 * 3.0)


def test_sampler_defaults_and_choices():
  assert image_lib.resolve_sampler(None, "ddpm", None) == ("ddpm", 250)
  assert image_lib.resolve_sampler(None, "flow", None) == ("euler", 50)
  assert image_lib.resolve_sampler("ddim", "ddpm", 20) == ("ddim", 20)
  assert image_lib.resolve_sampler("heun", "flow", None) == ("heun", 25)
  with pytest.raises(ValueError, match=r"unknown sampler 'lms'; choose from \['ddpm', 'ddim', "):
    image_lib.resolve_sampler("lms", "ddpm", None)
  with pytest.raises(ValueError, match=r"sampler 'ddim' is for the 'ddpm' objective.*\['euler', "
                                       r"'heun'\]"):
    image_lib.resolve_sampler("ddim", "flow", None)
  with pytest.raises(ValueError, match="steps must be >= 1"):
    image_lib.resolve_sampler("euler", "flow", 0)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_the_jitted_denoising_loop_runs_the_same_steps(sampler):
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))
  flow = diffusion.RectifiedFlow("uniform")
  loop = jax.jit(lambda k: image_lib.denoising_loop(
      exact_velocity, k, jnp.asarray(flow.sampling_times(5)), objective=flow, sampler=sampler,
      latent_shape=(2, 2, 1)))
  z = image_lib.initial_noise(keys, (2, 2, 1))
  np.testing.assert_allclose(loop(keys), solve(sampler, 5, z), atol=1e-5)


def test_clip_x0_bounds_the_clean_estimate_of_ddpm_steps():
  ddpm = diffusion.CosineDDPM()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 1, 4, 4, 2)), jnp.float32)
  bad_eps = x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32)  # 5% off at t=999
  noise = jnp.zeros_like(x)
  free = ddpm.step(x, bad_eps, 0.999, -1.0, noise, eta=0.0)
  assert np.abs(free).max() > 100  # the error is amplified by 1 / sqrt(alpha_bar) ~ 2e4
  clipped = ddpm.step(x, bad_eps, 0.999, -1.0, noise, eta=0.0, clip_x0=3.0)
  assert np.abs(clipped).max() <= 3.0 + 1e-6
  # A bound nothing reaches changes nothing (the noise estimate is recomputed consistently).
  for t_next in (0.5, -1.0):
    np.testing.assert_allclose(ddpm.step(x, bad_eps, 0.6, t_next, noise, clip_x0=1e6),
                               ddpm.step(x, bad_eps, 0.6, t_next, noise), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="clip_x0"):
    image_lib.resolve_sampler("euler", "flow", None, clip_x0=2.0)


def exact_epsilon(objective, mean, std):
  """E[eps | x_t = x] for data x0 ~ N(mean, std^2) per coordinate (the optimal DDPM model)."""
  return lambda x, t: diffusion.gaussian_optimal_prediction(objective, x, t, mean, std)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 50)])
def test_the_generators_denoising_loop_reproduces_gaussian_data(sampler, steps):
  """The loop image.sample runs (noise per sample and step, the sampler's updates), driven by
  the closed-form optimal denoiser: its samples must have the data's mean and spread, and
  DDIM, deterministic, must map each starting noise z to about mean + std * z."""
  mean, std, n = 0.7, 0.3, 20000
  ddpm = diffusion.CosineDDPM()
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(n))
  loop = jax.jit(lambda k: image_lib.denoising_loop(
      exact_epsilon(ddpm, mean, std), k, jnp.asarray(ddpm.sampling_times(steps)),
      objective=ddpm, sampler=sampler, latent_shape=(1, 1, 1)))
  x = np.asarray(loop(keys)).ravel()
  assert abs(x.mean() - mean) < 0.01
  assert abs(x.std() - std) < 0.015
  z = np.asarray(image_lib.initial_noise(keys, (1, 1, 1))).ravel()
  corr = np.corrcoef(x, z)[0, 1]
  if sampler == "ddim":  # (50 steps: the map is mean + std * z to within ~0.05)
    assert corr > 0.99, corr
  else:  # ancestral: fresh noise at each step leaves the end point weakly tied to the start
    assert corr < 0.5, corr
