"""The joint objective observed directly: L = L_LM + lambda * L_image against numpy on
hand-built inputs, and the diffusion times the model actually receives (sampled, per image,
bounded by `image_max_t`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import configlib, diffusion, losses

V = 5
LATENT = (2, 2, 1)


def _hand_built(rng):
  """B=2 rows of L=4 positions, M=3 slots of which 2 hold an image (one row has none)."""
  logits = rng.standard_normal((2, 4, V)).astype(np.float32)
  batch = {
      "targets": np.array([[1, 4, 0, 2], [3, 3, 1, 0]], np.int32),
      "text_loss_mask": np.array([[True, True, False, True], [False, True, False, False]]),
      "image_mask": np.array([[True, False, True], [False, False, False]]),
  }
  target = rng.standard_normal((2, 3, *LATENT)).astype(np.float32)
  prediction = target + rng.standard_normal(target.shape).astype(np.float32) * [
      [[[[0.5]]], [[[1.0]]], [[[2.0]]]]]  # a different error per slot
  prediction[~batch["image_mask"]] = 1e3  # garbage in empty slots must not count
  return logits, prediction, target, batch


def _numpy_loss(logits, prediction, target, batch, image_weight):
  """L_LM: mean cross-entropy over the masked positions; L_image: mean over REAL images of
  each image's mean squared error."""
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  text = ce[batch["text_loss_mask"]].mean()
  per_image = ((prediction - target) ** 2).mean(axis=(2, 3, 4))
  image = per_image[batch["image_mask"]].mean()
  return text + image_weight * image, text, image


@pytest.mark.parametrize("image_weight", [1.0, 5.0])
def test_joint_loss_matches_numpy_with_empty_slots(image_weight):
  logits, prediction, target, batch = _hand_built(np.random.default_rng(0))
  total, text, image = _numpy_loss(logits, prediction, target, batch, image_weight)
  loss, metrics = losses.joint_loss(jnp.asarray(logits), jnp.asarray(prediction),
                                    jnp.asarray(target), batch, image_weight=image_weight)
  np.testing.assert_allclose(metrics["text_loss"], text, rtol=1e-5)
  np.testing.assert_allclose(metrics["image_loss"], image, rtol=1e-5)
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
  assert metrics["text_tokens"] == 4 and metrics["images"] == 2


# ------------------------------------------------------------------ the times the model sees


class _SpyModel:
  """Stands in for the Transfusion module: records what `apply` receives, returns zeros."""

  def __init__(self, config):
    self.config = config
    self.calls = []

  def apply(self, params, tokens, positions, segment_ids, image_index, noisy, t):
    del params, positions, segment_ids, image_index
    self.calls.append({"noisy": np.asarray(noisy), "t": np.asarray(t)})
    return jnp.zeros((*tokens.shape, self.config.vocab_size)), jnp.zeros_like(noisy)


class _SpyObjective:
  """Wraps a real objective and records the times it draws and the noise it mixes in."""

  def __init__(self, inner):
    self.inner = inner
    self.sampled, self.noised = [], []

  def sample_time(self, rng, max_t):
    t = self.inner.sample_time(rng, max_t)
    self.sampled.append(np.asarray(t))
    return t

  def noisy(self, x0, noise, t):
    self.noised.append({"x0": np.asarray(x0), "noise": np.asarray(noise), "t": np.asarray(t)})
    return self.inner.noisy(x0, noise, t)

  def target(self, x0, noise, t):
    return self.inner.target(x0, noise, t)


def _batch(rng, b=32, m=4, length=8):
  """A structurally valid batch; half the slots are noise-limited (max_t 0.5)."""
  max_t = np.where(np.arange(b * m).reshape(b, m) % 2 == 0, 1.0, 0.5).astype(np.float32)
  return {
      "tokens": np.zeros((b, length), np.int32), "targets": np.zeros((b, length), np.int32),
      "text_loss_mask": np.zeros((b, length), bool), "segment_ids": np.ones((b, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
      "image_index": np.full((b, length), -1, np.int32),
      "images": rng.standard_normal((b, m, *LATENT)).astype(np.float32),
      "image_mask": np.ones((b, m), bool), "image_max_t": max_t,
  }


@pytest.mark.parametrize("objective", [diffusion.CosineDDPM(), diffusion.RectifiedFlow("uniform")])
def test_the_model_receives_the_sampled_times_bounded_by_image_max_t(objective):
  config = configlib.base_config().model
  config.vocab_size = V
  config.image.update(latent_size=LATENT[0], latent_channels=LATENT[2], patch_size=1)
  model, spy = _SpyModel(config), _SpyObjective(objective)
  batch = _batch(np.random.default_rng(0))
  losses.make_loss_fn(model, spy)(None, batch, jax.random.PRNGKey(3))  # eager: concrete values
  (call,), (sampled,), (noised,) = model.calls, spy.sampled, spy.noised
  # The times given to the model are the ones drawn, image by image.
  np.testing.assert_array_equal(call["t"], sampled)
  np.testing.assert_array_equal(noised["t"], sampled)
  # ...and the latents it sees are the clean ones noised at exactly those times.
  np.testing.assert_array_equal(noised["x0"], batch["images"])
  np.testing.assert_allclose(call["noisy"], objective.noisy(batch["images"], noised["noise"],
                                                            sampled), rtol=1e-6, atol=1e-6)
  # Noise limiting: image-first slots stay below 0.5, the others use the whole range.
  limited = batch["image_max_t"] == 0.5
  assert sampled[limited].max() < 0.5
  assert sampled[~limited].max() > 0.6
  assert sampled.min() >= 0 and len(np.unique(sampled)) > 20
