"""The Transfusion objective: L = L_LM + lambda * L_image (lambda = 5 in the paper).

L_LM is the mean next-token cross-entropy over `text_loss_mask`; L_image is the mean over
real image slots of the per-image MSE between the model's prediction and the diffusion target
(epsilon for DDPM, velocity for rectified flow). Noise and times are drawn inside the loss
from `rng`, per image, with times bounded by `image_max_t` (noise limiting).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import batch as batch_lib
from tfusion import chunked_ce


def make_loss_fn(model, objective, *, image_weight=5.0, ce_chunk_size=0):
  """Builds `loss_fn(params, batch, rng) -> (loss, metrics)`, pure and jit-able.

  Args:
    model: a `Transfusion` module.
    objective: a diffusion objective (tfusion/diffusion.py).
    image_weight: lambda.
    ce_chunk_size: 0 = dense logits [B, L, V]; > 0 = the text CE over chunks of this many
      positions, never holding the full float32 logits (`config.loss.ce_chunk_size`).
  Returns:
    loss_fn. metrics holds text_loss, image_loss, text_tokens (count), images (count).
  """
  img = model.config.image
  latent_shape = (img.latent_size, img.latent_size, img.latent_channels)

  def loss_fn(params, batch, rng):
    batch_lib.check_batch_structure(batch, latent_shape=latent_shape)
    x0 = batch["images"].astype(jnp.float32)
    time_rng, noise_rng = jax.random.split(rng)
    t = objective.sample_time(time_rng, batch["image_max_t"].astype(jnp.float32))
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    noisy = objective.noisy(x0, noise, t)
    # Per-image weights (min-SNR); objectives without them weight every image 1.
    weights = objective.loss_weight(t) if hasattr(objective, "loss_weight") else None
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_index"],
              noisy, t)
    if ce_chunk_size:
      with nn.intercept_methods(_hidden_instead_of_logits):
        (hidden, head), prediction = model.apply(params, *inputs)
      token_ce = chunked_ce.chunked_cross_entropy(
          hidden, head, batch["targets"], chunk_size=ce_chunk_size,
          dtype=jnp.dtype(model.config.dtype))
      return joint_loss(None, prediction, objective.target(x0, noise, t), batch,
                        image_weight=image_weight, token_ce=token_ce, image_weights=weights)
    logits, prediction = model.apply(params, *inputs)
    return joint_loss(logits, prediction, objective.target(x0, noise, t), batch,
                      image_weight=image_weight, image_weights=weights)

  return loss_fn


def _hidden_instead_of_logits(next_fun, args, kwargs, context):
  """Method interceptor: `Transfusion.text_logits(h)` returns (h [B, L, d], head [d, V]).

  The forward pass stays the model's own `__call__`; only the last matmul moves into the
  chunked loss.
  """
  if context.method_name != "text_logits":
    return next_fun(*args, **kwargs)
  module = context.module
  if module.config.tie_embeddings:
    head = module.embedding.embedding.T
  else:
    head = nn.meta.unbox(module.lm_head.variables["params"]["kernel"])
  return args[0], head


def joint_loss(logits, prediction, target, batch, *, image_weight, token_ce=None,
               image_weights=None):
  """Combines the two losses from model outputs.

  Args:
    logits: float [B, L, V] (None when token_ce is given). prediction, target: [B, M, h, w, c].
    batch: the batch (uses targets, text_loss_mask, image_mask).
    token_ce: float [B, L] per-position CE already computed (the chunked path).
    image_weights: float [B, M] per-image weight of the squared error (None: 1).
  Returns:
    (loss, metrics dict of scalars).
  """
  text_mask = batch["text_loss_mask"].astype(jnp.float32)
  if token_ce is None:
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                               batch["targets"])
  ce = token_ce
  text_count = text_mask.sum()
  text_loss = (ce * text_mask).sum() / jnp.maximum(text_count, 1.0)

  image_mask = batch["image_mask"].astype(jnp.float32)
  per_image = jnp.mean(jnp.square(prediction - target), axis=(-3, -2, -1))  # [B, M]
  per_image = jnp.where(batch["image_mask"], per_image, 0.0)  # keeps garbage out of empty slots
  if image_weights is not None:
    per_image = per_image * image_weights
  image_count = image_mask.sum()
  image_loss = per_image.sum() / jnp.maximum(image_count, 1.0)

  loss = text_loss + image_weight * image_loss
  metrics = {
      "loss": loss,
      "text_loss": text_loss,
      "image_loss": image_loss,
      "text_tokens": text_count,
      "images": image_count,
  }
  return loss, metrics
