"""The `loss` eval suite: the training objective, text and image, on held-out records.

Validation losses are what loss-vs-FLOPs curves and ablations compare first: the image
(diffusion) loss separates attention variants long before sample metrics saturate. Batches
come from the training pipeline (tfusion/data/pipeline.py) pointed at `config.eval.loss_text`,
`loss_image_caption` and `loss_interleaved`, with caption dropout off and the eval seed; the
diffusion times and noise come from a fixed key. So every checkpoint is scored on identical
inputs and two runs with the same data config are comparable number for number.
"""

import jax
import ml_collections
import numpy as np

from tfusion import diffusion, losses

SOURCES = ("text", "image_caption", "interleaved")


def heldout_config(config):
  """The run's config with its data sources replaced by the held-out ones (a copy)."""
  c = ml_collections.ConfigDict(config.to_dict())
  e, d = config.eval, c.data
  d.source = "grain"
  for kind in SOURCES:
    d[kind] = e[f"loss_{kind}"]
  if not any(d[kind] and d[f"{kind}_weight"] > 0 for kind in SOURCES):
    raise ValueError("the loss suite needs config.eval.loss_text, loss_image_caption or "
                     "loss_interleaved (held-out ArrayRecord files) for a source whose "
                     "config.data.<source>_weight is > 0")
  d.caption_dropout = 0.0  # score the conditional model
  d.batch_size = e.batch_size
  d.worker_count, d.prefetch, d.num_epochs = 0, 0, 0
  c.seed = e.seed
  return c


def heldout_loss(model, params, config, *, rows, tokenizer=None):
  """Mean text and image loss over `rows` packed held-out rows (config.eval.batch_size at a time).

  Returns {"loss/text", "loss/image", "loss/total", "loss/text_tokens", "loss/images"}: the
  text loss is token-weighted and the image loss image-weighted over all rows (not a mean of
  batch means); total = text + config.loss.image_weight * image, as in training (discrete
  images: the mean CE over text and image tokens together, as in training).
  """
  from tfusion.data import pipeline
  c = heldout_config(config)
  image_weight = config.loss.image_weight
  loss_fn = jax.jit(losses.make_loss_fn(model, diffusion.from_config(c), image_weight=image_weight))
  it = pipeline.make_iterator(c, tokenizer=tokenizer)
  text_sum = image_sum = tokens = images = image_tokens = 0.0
  try:
    for i in range(max(1, -(-rows // c.data.batch_size))):
      batch = next(it)
      _, m = loss_fn(params, batch, jax.random.fold_in(jax.random.PRNGKey(c.seed), i))
      m = jax.device_get(m)
      tokens += float(m["text_tokens"])
      images += float(m["images"])
      text_sum += float(m["text_loss"]) * float(m["text_tokens"])
      image_sum += float(m["image_loss"]) * float(m["images"])
      image_tokens += float(m.get("image_tokens", 0.0))
  finally:
    it.close()
  text = text_sum / tokens if tokens else float("nan")
  image = image_sum / images if images else float("nan")
  if image_tokens:  # discrete: image_loss is per code token
    total = (text_sum + image_sum * image_tokens / images) / (tokens + image_tokens)
  else:
    total = np.nansum([text, image_weight * image])
  return {"loss/text": text, "loss/image": image, "loss/total": float(total),
          "loss/text_tokens": tokens, "loss/images": images}
