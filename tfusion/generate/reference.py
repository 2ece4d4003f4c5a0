"""Generation without a cache: the whole sequence goes through the training forward pass at
every step. Slow by design; the definition the cached paths are tested and benchmarked against.

Documents are written as lists of items: an int token id, or an image `(latents [h, w, c], t)`
occupying N patch positions (<boi>/<eoi> are ordinary token items).
"""

import jax
import jax.numpy as jnp
import numpy as np

from tfusion.generate import image as image_lib


def layout_rows(docs, length, num_patches, latent_shape, num_slots=None):
  """Documents -> the batch contract's model inputs, one document per row, right-padded.

  `num_slots` (M) defaults to the most images in one document.

  Returns:
    dict of numpy arrays: tokens, positions, segment_ids, image_index [B, L]; images
    [B, M, h, w, c]; image_time [B, M]; lengths [B]; last_slot [B] (the slot of the row's
    last image, 0 if none).
  """
  b = len(docs)
  m = num_slots or max(1, max(sum(not isinstance(it, (int, np.integer)) for it in d) for d in docs))
  out = dict(tokens=np.zeros((b, length), np.int32), positions=np.zeros((b, length), np.int32),
             segment_ids=np.zeros((b, length), np.int32),
             image_index=np.full((b, length), -1, np.int32),
             images=np.zeros((b, m, *latent_shape), np.float32),
             image_time=np.zeros((b, m), np.float32), lengths=np.zeros(b, np.int32),
             last_slot=np.zeros(b, np.int32))
  for row, doc in enumerate(docs):
    cursor, slot = 0, 0
    for item in doc:
      if isinstance(item, (int, np.integer)):
        span = slice(cursor, cursor + 1)
        out["tokens"][row, cursor] = item
      else:
        latents, t = item
        span = slice(cursor, cursor + num_patches)
        out["image_index"][row, span] = slot
        out["images"][row, slot] = latents
        out["image_time"][row, slot] = t
        out["last_slot"][row] = slot
        slot += 1
      if span.stop > length:
        raise ValueError(f"document {row} needs more than {length} positions")
      out["segment_ids"][row, span] = 1
      out["positions"][row, span] = np.arange(span.start, span.stop)
      cursor = span.stop
    out["lengths"][row] = cursor
  return out


def full_forward(model, params, rows, images=None, image_time=None):
  """(text logits [B, L, V], image predictions [B, M, h, w, c]) of `layout_rows` output
  (`images` / `image_time` replace the rows' own)."""
  images = rows["images"] if images is None else images
  image_time = rows["image_time"] if image_time is None else image_time
  return model.apply(params, rows["tokens"], rows["positions"], rows["segment_ids"],
                     rows["image_index"], images, image_time)


def forward_last_image_at(model, params, rows, x, t):
  """Full forward with each row's last image set to latents x [B, h, w, c] at time t (scalar).

  Returns (text logits [B, L, V], the prediction for that image [B, h, w, c]).
  """
  b, m = rows["images"].shape[:2]
  slot = jax.nn.one_hot(rows["last_slot"], m, dtype=bool)  # [B, M]
  images = jnp.where(slot[:, :, None, None, None], x[:, None], rows["images"])
  image_time = jnp.where(slot, t, rows["image_time"])
  logits, pred = full_forward(model, params, rows, images, image_time)
  return logits, pred[jnp.arange(b), rows["last_slot"]]


def sample_full_sequence(model, params, cond_rows, uncond_rows, keys, times, guidance_scale, *,
                         objective, sampler, guided, clip_x0=None):
  """Draws the last image of each row, recomputing the whole sequence at every step.

  cond_rows / uncond_rows: `layout_rows` output whose last image is the one drawn (its
  latents and time are replaced at each step). Noise as `image.sample`. -> [B, h, w, c].
  """
  latent_shape = cond_rows["images"].shape[2:]

  def predict(x, t):
    cond = forward_last_image_at(model, params, cond_rows, x, t)[1]
    if not guided:
      return cond
    uncond = forward_last_image_at(model, params, uncond_rows, x, t)[1]
    return image_lib.guide(cond, uncond, guidance_scale)

  return image_lib.denoising_loop(predict, keys, times, objective=objective, sampler=sampler,
                                  latent_shape=latent_shape, clip_x0=clip_x0)


def greedy_decode_full_sequence(model, params, rows, max_new_tokens):
  """Greedy text after each row's content, recomputing the whole sequence at every step.

  rows: `layout_rows` output with room for `max_new_tokens` after each row's `lengths`.
  Returns (tokens int32 [B, max_new_tokens], the logits each was chosen from [B, n, V]).
  """
  b = rows["tokens"].shape[0]
  arange = jnp.arange(b)

  def body(i, carry):
    rows, tokens, all_logits = carry
    logits, _ = full_forward(model, params, rows)
    at = rows["lengths"] + i  # the slot the new token goes to
    step_logits = logits[arange, at - 1]
    token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    rows = dict(rows, tokens=rows["tokens"].at[arange, at].set(token),
                segment_ids=rows["segment_ids"].at[arange, at].set(1),
                positions=rows["positions"].at[arange, at].set(at))
    return (rows, tokens.at[:, i].set(token), all_logits.at[:, i].set(step_logits))

  vocab = model.config.vocab_size
  init = (rows, jnp.zeros((b, max_new_tokens), jnp.int32),
          jnp.zeros((b, max_new_tokens, vocab), jnp.float32))
  _, tokens, all_logits = jax.lax.fori_loop(0, max_new_tokens, body, init)
  return tokens, all_logits
