"""The Transfusion objective: L = L_LM + lambda * L_image (lambda = 5 in the paper).

L_LM is the mean next-token cross-entropy over `text_loss_mask`; L_image is the mean over
real image slots of the per-image MSE between the model's prediction and the diffusion target
(epsilon for DDPM, velocity for rectified flow). Noise and times are drawn inside the loss
from `rng`, per image, with times bounded by `image_max_t` (noise limiting).

Discrete images (config.model.image.representation="discrete", the Chameleon baseline): one
next-token CE over every position of `text_loss_mask` (text and image tokens alike; no
diffusion). `text_loss` is then the CE over text targets and `image_loss` (also
`image_token_loss`) the CE over image-token targets (tfusion/discrete.py's id range), so
curves of both representations are read side by side; `loss` is the CE over all of them.
An optional z-loss (config.loss.z_loss, Chameleon's) adds z * mean(logsumexp(logits)^2) over
the same positions, in both representations.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tfusion import batch as batch_lib
from tfusion import chunked_ce
from tfusion import discrete as discrete_lib


def make_loss_fn(model, objective, *, image_weight=5.0, ce_chunk_size=0, z_loss=0.0):
  """Builds `loss_fn(params, batch, rng) -> (loss, metrics)`, pure and jit-able.

  Args:
    model: a `Transfusion` module.
    objective: a diffusion objective (tfusion/diffusion.py).
    image_weight: lambda.
    ce_chunk_size: 0 = dense logits [B, L, V]; > 0 = the text CE over chunks of this many
      positions, never holding the full float32 logits (`config.loss.ce_chunk_size`).
    z_loss: z-loss coefficient (config.loss.z_loss; 0 = off).
  Returns:
    loss_fn. metrics holds text_loss, image_loss, text_tokens (count), images (count)
    (discrete: also image_token_loss, image_tokens, z_loss).
  """
  img = model.config.image
  if discrete_lib.is_discrete(model.config):
    return _make_discrete_loss_fn(model, ce_chunk_size=ce_chunk_size, z_loss=z_loss)
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
      token_ce, lse = chunked_ce.chunked_cross_entropy(
          hidden, head, batch["targets"], chunk_size=ce_chunk_size,
          dtype=jnp.dtype(model.config.dtype), return_lse=True)
      return joint_loss(None, prediction, objective.target(x0, noise, t), batch,
                        image_weight=image_weight, token_ce=token_ce, image_weights=weights,
                        z_loss=z_loss, token_lse=lse)
    logits, prediction = model.apply(params, *inputs)
    return joint_loss(logits, prediction, objective.target(x0, noise, t), batch,
                      image_weight=image_weight, image_weights=weights, z_loss=z_loss)

  return loss_fn


def _make_discrete_loss_fn(model, *, ce_chunk_size, z_loss):
  cfg = model.config
  offset, k = discrete_lib.image_token_offset(cfg), discrete_lib.codebook_size(cfg)
  n = discrete_lib.num_image_tokens(cfg)

  def loss_fn(params, batch, rng):
    del rng  # nothing is random: no noise, no times
    batch_lib.check_batch_structure(batch)
    inputs = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_index"],
              batch["images"], batch["image_max_t"])
    if ce_chunk_size:
      with nn.intercept_methods(_hidden_instead_of_logits):
        (hidden, head), _ = model.apply(params, *inputs)
      token_ce, lse = chunked_ce.chunked_cross_entropy(
          hidden, head, batch["targets"], chunk_size=ce_chunk_size,
          dtype=jnp.dtype(cfg.dtype), return_lse=True)
      return discrete_loss(None, batch, image_token_offset=offset, codebook_size=k,
                           tokens_per_image=n, z_loss=z_loss, token_ce=token_ce, token_lse=lse)
    logits, _ = model.apply(params, *inputs)
    return discrete_loss(logits, batch, image_token_offset=offset, codebook_size=k,
                         tokens_per_image=n, z_loss=z_loss)

  return loss_fn


def _ce_and_lse(logits, targets, token_ce, token_lse):
  if token_ce is None:
    logits = logits.astype(jnp.float32)
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    token_lse = jax.nn.logsumexp(logits, axis=-1)
  return token_ce, token_lse


def discrete_loss(logits, batch, *, image_token_offset, codebook_size, tokens_per_image,
                  z_loss=0.0, token_ce=None, token_lse=None):
  """Next-token loss over text and image tokens (the Chameleon baseline).

  Args:
    logits: float [B, L, V] (None when token_ce / token_lse are given).
    batch: the batch (uses targets, text_loss_mask).
    image_token_offset, codebook_size: image tokens are [offset, offset + codebook_size).
    tokens_per_image: codes per image (for the `images` count).
    z_loss: coefficient of mean(logsumexp^2) over the loss positions.
  Returns:
    (loss, metrics): loss = mean CE over all loss positions + z-loss; text_loss over text
    targets, image_loss = image_token_loss over image-token targets, their counts.
  """
  ce, lse = _ce_and_lse(logits, batch["targets"], token_ce, token_lse)
  mask = batch["text_loss_mask"]
  targets = batch["targets"]
  is_image = (targets >= image_token_offset) & (targets < image_token_offset + codebook_size)
  image_mask = (mask & is_image).astype(jnp.float32)
  text_mask = (mask & ~is_image).astype(jnp.float32)
  all_mask = mask.astype(jnp.float32)
  count = all_mask.sum()
  text_count, image_count = text_mask.sum(), image_mask.sum()
  mean = lambda x, m, c: (x * m).sum() / jnp.maximum(c, 1.0)
  lm_loss = mean(ce, all_mask, count)
  z = mean(jnp.square(lse), all_mask, count)
  image_loss = mean(ce, image_mask, image_count)
  loss = lm_loss + z_loss * z
  metrics = {"loss": loss, "lm_loss": lm_loss, "text_loss": mean(ce, text_mask, text_count),
             "image_loss": image_loss, "image_token_loss": image_loss,
             "text_tokens": text_count, "image_tokens": image_count,
             "images": image_count / tokens_per_image, "z_loss": z}
  return loss, metrics


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
               image_weights=None, z_loss=0.0, token_lse=None):
  """Combines the two losses from model outputs.

  Args:
    logits: float [B, L, V] (None when token_ce is given). prediction, target: [B, M, h, w, c].
    batch: the batch (uses targets, text_loss_mask, image_mask).
    token_ce: float [B, L] per-position CE already computed (the chunked path).
    image_weights: float [B, M] per-image weight of the squared error (None: 1).
    z_loss: coefficient of mean(logsumexp(logits)^2) over the text loss positions (0: off;
      token_lse [B, L] gives the logsumexp on the chunked path).
  Returns:
    (loss, metrics dict of scalars).
  """
  text_mask = batch["text_loss_mask"].astype(jnp.float32)
  z = None
  if z_loss:
    token_ce, token_lse = _ce_and_lse(logits, batch["targets"], token_ce, token_lse)
    z = (jnp.square(token_lse) * text_mask).sum() / jnp.maximum(text_mask.sum(), 1.0)
  elif token_ce is None:
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
  if z is not None:
    loss = loss + z_loss * z
  metrics = {
      "loss": loss,
      "text_loss": text_loss,
      "image_loss": image_loss,
      "text_tokens": text_count,
      "images": image_count,
  }
  if z is not None:
    metrics["z_loss"] = z
  return loss, metrics
