"""DDPM prediction targets (eps, v, x0), min-SNR weighting, zero terminal SNR, step spacing,
and the checks of config.diffusion / sampler settings (issue 16)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import configlib, diffusion, losses
from tfusion.generate import image as image_lib

MU, S = 0.7, 0.5  # data x0 ~ N(MU, S^2) per coordinate
FAST = {"xla_backend_optimization_level": 0}


def ddpm(**kw):
  config = configlib.base_config()
  config.diffusion.update(kw)
  return diffusion.from_config(config)


# -- targets and their conversions ----------------------------------------------------------


@pytest.mark.parametrize("prediction,ztsnr", [("eps", False), ("v", False), ("x0", False),
                                              ("v", True), ("x0", True)])
def test_each_target_converts_back_to_x0_and_noise(prediction, ztsnr):
  obj = ddpm(prediction=prediction, zero_terminal_snr=ztsnr)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.standard_normal((3, 2, 2, 2, 1)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  t = jnp.asarray([[0.0, 0.3], [0.5, 0.9], [0.98, 0.999]], jnp.float32)
  if ztsnr:  # the last step is pure noise: x_t says nothing about x0, the target does
    assert float(obj._alpha_bar(jnp.float32(0.999))) == 0.0
  x_t = obj.noisy(x0, noise, t)
  got_x0, got_noise = obj.predict_x0_and_noise(x_t, obj.target(x0, noise, t), t)
  np.testing.assert_allclose(got_x0, x0, atol=2e-3)
  np.testing.assert_allclose(got_noise, noise, atol=2e-3)


def optimal_target(objective, x, t):
  """E[target | x_t = x] for Gaussian data, for objective.prediction."""
  return diffusion.gaussian_optimal_prediction(objective, x, t, MU, S)


def sample_latents(objective, sampler, steps, predict, n=128, shape=(4, 4, 4)):
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1), i))(jnp.arange(n))
  times = jnp.asarray(objective.sampling_times(steps))
  return np.asarray(jax.jit(lambda k: image_lib.denoising_loop(
      predict, k, times, objective=objective, sampler=sampler, latent_shape=shape),
      compiler_options=FAST)(keys))


@pytest.mark.parametrize("prediction,sampler,ztsnr", [
    ("eps", "ddpm", False), ("eps", "ddim", False), ("v", "ddpm", False), ("v", "ddim", False),
    ("x0", "ddpm", False), ("x0", "ddim", False), ("v", "ddpm", True), ("x0", "ddim", True)])
def test_a_model_predicting_each_target_exactly_reproduces_the_data(prediction, sampler, ztsnr):
  """Through the real loop with config.diffusion's sampler defaults (clip at 3, trailing)."""
  obj = ddpm(prediction=prediction, zero_terminal_snr=ztsnr)
  x = sample_latents(obj, sampler, image_lib.SAMPLERS[sampler].default_steps,
                     lambda x, t: optimal_target(obj, x, t))
  assert abs(x.mean() - MU) < 0.02, x.mean()
  assert abs(x.std() - S) < 0.02, x.std()


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_samplers_with_the_exact_velocity_reproduce_the_data(sampler):
  flow = diffusion.RectifiedFlow("uniform")

  def velocity(x, t):
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    centred = x - (1 - t) * MU
    return (t / var) * centred - (MU + (1 - t) * S ** 2 / var * centred)

  x = sample_latents(flow, sampler, image_lib.SAMPLERS[sampler].default_steps, velocity)
  assert abs(x.mean() - MU) < 0.02 and abs(x.std() - S) < 0.02, (x.mean(), x.std())


# -- the schedule and its steps --------------------------------------------------------------


def test_timestep_spacings_match_lin_et_al_table_2():
  """T = 1000, 10 steps; the paper's steps are 1-based, ours 0-based."""
  lin = lambda spacing: diffusion.spaced_steps(1000, 10, spacing) + 1
  np.testing.assert_array_equal(lin("linspace"),
                                [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1])
  np.testing.assert_array_equal(lin("leading"), [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
  np.testing.assert_array_equal(lin("trailing"),
                                [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100])
  times = ddpm(timestep_spacing="leading").sampling_times(10)
  np.testing.assert_allclose(times, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -1.0])
  for spacing in diffusion.SPACINGS:  # strictly decreasing for any count up to T
    for steps in (1, 7, 250, 1000):
      s = diffusion.spaced_steps(1000, steps, spacing)
      assert len(s) == steps and s.max() <= 999 and s.min() >= 0 and np.all(np.diff(s) < 0)


def test_zero_terminal_snr_rescale():
  ab = diffusion.cosine_alpha_bars(1000)
  rescaled = diffusion.rescale_zero_terminal_snr(ab)
  assert rescaled[-1] == 0.0 and ab[-1] > 0
  np.testing.assert_allclose(rescaled[0], ab[0], rtol=1e-12)
  assert np.all(np.diff(rescaled) < 0)
  # Lin et al.: sqrt(alpha_bar) is shifted and scaled, i.e. an affine map of the old one.
  slope, intercept = np.polyfit(np.sqrt(ab), np.sqrt(rescaled), 1)
  np.testing.assert_allclose(np.sqrt(rescaled), slope * np.sqrt(ab) + intercept, atol=1e-12)


# -- training: min-SNR weights and the loss --------------------------------------------------


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error_for_every_target(prediction):
  """Hang et al.: the loss is min(SNR, gamma) |x0_hat - x0|^2 whatever the model predicts."""
  obj = ddpm(prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
  rng = np.random.default_rng(1)
  t = jnp.asarray(np.arange(0, 1000, 37).reshape(-1, 1) / 1000, jnp.float32)  # [27, 1]
  x0 = jnp.asarray(rng.standard_normal((t.shape[0], 1, 4, 4, 2)), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  x_t = obj.noisy(x0, noise, t)
  error = 0.1 * jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  x0_hat, _ = obj.predict_x0_and_noise(x_t, obj.target(x0, noise, t) + error, t)
  weighted = obj.loss_weight(t) * jnp.mean(error ** 2, axis=(-3, -2, -1))
  snr = np.asarray(obj.snr(t))
  assert snr.min() < 5.0 < snr.max()  # both sides of gamma
  want = np.minimum(snr, 5.0) * np.mean((np.asarray(x0_hat) - np.asarray(x0)) ** 2,
                                        axis=(-3, -2, -1))
  np.testing.assert_allclose(weighted, want, rtol=2e-3, atol=1e-6)
  np.testing.assert_array_equal(ddpm(prediction=prediction).loss_weight(t), np.ones(t.shape))


class _LinearModel:
  """Stands in for Transfusion: prediction = 0.5 x_t + 0.1; records what it was given."""

  def __init__(self, latent):
    self.config = types.SimpleNamespace(image=types.SimpleNamespace(
        latent_size=latent[0], latent_channels=latent[2]))
    self.calls = []

  def apply(self, params, tokens, positions, segment_ids, image_index, noisy, t):
    del params, positions, segment_ids, image_index
    jax.debug.callback(lambda n, t: self.calls.append((np.asarray(n), np.asarray(t))), noisy, t)
    return jnp.zeros((*tokens.shape, 8)), 0.5 * noisy + 0.1


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("eps", "min_snr"),
                                                  ("v", "min_snr"), ("x0", "min_snr")])
def test_the_training_loss_uses_the_configured_target_and_weighting(prediction, weighting):
  latent, b, m, length, gamma = (2, 2, 2), 4, 2, 4, 3.0
  rng = np.random.default_rng(2)
  batch = {
      "tokens": np.zeros((b, length), np.int32), "targets": np.zeros((b, length), np.int32),
      "text_loss_mask": np.zeros((b, length), bool),
      "segment_ids": np.ones((b, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
      "image_index": np.full((b, length), -1, np.int32),
      "images": rng.standard_normal((b, m, *latent)).astype(np.float32),
      "image_mask": np.array([[True, True], [True, False], [True, True], [False, True]]),
      "image_max_t": np.ones((b, m), np.float32)}
  model = _LinearModel(latent)
  obj = ddpm(prediction=prediction, loss_weighting=weighting, min_snr_gamma=gamma)
  loss_fn = jax.jit(losses.make_loss_fn(model, obj), compiler_options=FAST)
  _, metrics = loss_fn(None, batch, jax.random.PRNGKey(0))
  (noisy, t), = model.calls
  # numpy: the noise behind x_t, the target, the weight, the masked mean over images.
  ab = diffusion.cosine_alpha_bars(1000)[np.round(t * 1000).astype(int)][..., None, None, None]
  x0 = batch["images"].astype(np.float64)
  eps = (noisy - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
  target = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[prediction]
  snr = (ab / (1 - ab))[..., 0, 0, 0]
  weight = {"none": np.ones_like(snr), "min_snr": {
      "eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
      "x0": np.minimum(snr, gamma)}[prediction]}[weighting]
  mse = np.mean((0.5 * noisy + 0.1 - target) ** 2, axis=(2, 3, 4))
  want = (weight * mse)[batch["image_mask"]].mean()
  np.testing.assert_allclose(float(metrics["image_loss"]), want, rtol=1e-4)


# -- checks before compute -------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("prediction", "score", "config.diffusion.prediction must be one of"),
    ("loss_weighting", "p2", "config.diffusion.loss_weighting must be one of"),
    ("timestep_spacing", "karras", "config.diffusion.timestep_spacing must be one of"),
    ("x0_threshold", "soft", "config.diffusion.x0_threshold must be one of"),
    ("clip_x0", 0.0, "config.diffusion.clip_x0 must be a positive bound"),
    ("clip_x0", -3.0, "config.diffusion.clip_x0 must be a positive bound"),
    ("threshold_percentile", 1.5, "config.diffusion.threshold_percentile"),
    ("zero_terminal_snr", True, "zero_terminal_snr=True needs config.diffusion.prediction"),
])
def test_bad_diffusion_keys_fail_naming_the_key(key, value, match):
  config = configlib.base_config()
  config.diffusion[key] = value
  with pytest.raises(ValueError, match=match):
    diffusion.from_config(config)


def test_ddpm_only_keys_and_sampler_settings_are_refused_for_flow():
  config = configlib.base_config()
  config.diffusion.objective = "flow"
  diffusion.from_config(config)  # the DDPM sampler defaults are simply unused
  config.diffusion.prediction = "v"
  with pytest.raises(ValueError, match="config.diffusion.prediction='v' is for objective 'ddpm'"):
    diffusion.from_config(config)
  config.diffusion.prediction = "eps"
  with pytest.raises(ValueError, match="config.eval.timestep_spacing is a setting of the ddpm"):
    image_lib.sampling_objective(config, {"timestep_spacing": "leading"}, where="config.eval.")
  with pytest.raises(ValueError, match=r"sampler 'ddim' is for the 'ddpm' objective"):
    image_lib.resolve_sampler("ddim", "flow", None)


def test_sampler_overrides_are_checked_and_applied():
  config = configlib.base_config()
  with pytest.raises(ValueError, match="--clip_x0 must be a positive bound"):
    image_lib.sampling_objective(config, {"clip_x0": -1.0})
  with pytest.raises(ValueError, match="--timestep_spacing must be one of"):
    image_lib.sampling_objective(config, {"timestep_spacing": "even"})
  obj = image_lib.sampling_objective(config, {"x0_threshold": "dynamic", "clip_x0": 2.0,
                                              "timestep_spacing": None})
  assert (obj.x0_threshold, obj.clip_x0, obj.timestep_spacing) == ("dynamic", 2.0, "trailing")
  # A bound asked for while the config has thresholding off turns static clipping on.
  config.diffusion.x0_threshold = "none"
  assert image_lib.sampling_objective(config, {"clip_x0": 2.0}).x0_threshold == "static"
  assert image_lib.sampling_objective(config).x0_threshold == "none"


def test_dynamic_thresholding_clips_in_range_estimates_and_shrinks_saturated_ones():
  z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 8, 4)), jnp.float32)
  in_range = jnp.clip(z, -2.5, 2.5)
  np.testing.assert_array_equal(diffusion.threshold_x0(in_range, "dynamic", 3.0), in_range)
  out = np.asarray(diffusion.threshold_x0(100 * z, "dynamic", 3.0, 0.99))
  assert np.abs(out).max() <= 3.0 + 1e-5
  # Per sample, the values under the 99th percentile keep their ratios (not flattened at 3).
  inside = np.abs(100 * np.asarray(z[0])) < np.quantile(np.abs(100 * np.asarray(z[0])), 0.99)
  ratio = out[0][inside] / (100 * np.asarray(z[0]))[inside]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  assert 0.005 < np.mean(np.abs(out[0]) > 3.0 - 1e-4) < 0.02


def test_eval_passes_and_records_the_sampler_settings(tmp_path):
  from tfusion.evaluate import suites
  config = configlib.base_config()
  config.eval.update(sampler="ddim", steps=20, timestep_spacing="leading", clip_x0=2.5,
                     batch_size=4)
  calls = []

  class FakeGenerator:
    def text_to_image(self, ids, keys, **kw):
      calls.append(kw)
      return np.zeros((len(ids), 2, 2, 1), np.float32)

  ctx = suites.EvalContext(config, None, 0, str(tmp_path))
  ctx.__dict__.update(generator=FakeGenerator(), image_decoder=lambda latents: latents,
                      tokenizer=types.SimpleNamespace(encode=lambda c: [1, 2]))
  ctx.generate_images(["a", "b", "c", "d", "e"])
  assert len(calls) == 2
  assert calls[0]["sampling"] == {"x0_threshold": None, "clip_x0": 2.5,
                                  "threshold_percentile": None, "timestep_spacing": "leading"}
  assert ctx.settings == {"sampler": "ddim", "steps": 20, "guidance_scale": 5.0,
                          "num_samples": 5, "timestep_spacing": "leading",
                          "x0_threshold": "static", "clip_x0": 2.5, "processes": 1,
                          "devices_per_process": 1}
  config.eval.timestep_spacing = "uniform"
  with pytest.raises(ValueError, match="config.eval.timestep_spacing must be one of"):
    ctx.generate_images(["a"])


def test_generate_flags_become_sampler_overrides():
  from tfusion.generate import cli
  args = cli.parse_args(["--workdir", "W", "--prompt", "p", "--out", "f.png",
                         "--x0_threshold", "dynamic", "--threshold_percentile", "0.99",
                         "--timestep_spacing", "leading", "--clip_x0", "2"])
  assert cli.sampling_overrides(args) == {"x0_threshold": "dynamic",
                                          "threshold_percentile": 0.99,
                                          "timestep_spacing": "leading"}
  assert args.clip_x0 == 2.0  # passed on its own (Generator's clip_x0 argument)
  args = cli.parse_args(["--workdir", "W", "--prompt", "p", "--out", "f.png"])
  assert set(cli.sampling_overrides(args).values()) == {None}  # config.diffusion's


def test_generator_resolves_the_settings_it_samples_with():
  from tfusion.generate import engine
  config = configlib.base_config()
  gen = engine.Generator(config, {"params": {}}, engine.SpecialTokens(1, 2, 3, 4))
  assert gen.sampling_settings() == {"sampler": "ddpm", "steps": 250, "x0_threshold": "static",
                                     "clip_x0": 3.0, "timestep_spacing": "trailing"}
  assert gen.sampling_settings("ddim", 20, 2.0, {"timestep_spacing": "leading"}) == {
      "sampler": "ddim", "steps": 20, "x0_threshold": "static", "clip_x0": 2.0,
      "timestep_spacing": "leading"}
  with pytest.raises(ValueError, match="--x0_threshold must be one of"):
    gen.sampling_settings(sampling={"x0_threshold": "hard"})
