"""The batch contract (DESIGN.md) as code: key names, dtypes, shapes and value checks.

`check_batch_structure` runs at trace time (shapes and dtypes only); `check_batch_values`
runs on host arrays (numpy) before a step and catches layout errors that would otherwise
become silent garbage or NaNs. Both raise `BatchContractError` naming the key and the problem.
"""

import numpy as np

TEXT_KEYS = ("tokens", "targets", "text_loss_mask", "segment_ids", "positions", "image_index")
IMAGE_KEYS = ("images", "image_mask", "image_max_t")
KEYS = TEXT_KEYS + IMAGE_KEYS

_KINDS = {
    "tokens": "i", "targets": "i", "segment_ids": "i", "positions": "i", "image_index": "i",
    "text_loss_mask": "b", "image_mask": "b", "images": "f", "image_max_t": "f",
}


class BatchContractError(ValueError):
  """A batch does not follow the contract in DESIGN.md."""


def _kind(x):
  return np.dtype(x.dtype).kind


def check_batch_structure(batch, *, latent_shape=None):
  """Checks keys, dtypes and shapes (works on numpy, jax arrays and tracers).

  Args:
    batch: dict with the contract's keys.
    latent_shape: optional (h, w, c) the model expects per image.
  Returns:
    (B, L, M).
  """
  missing = [k for k in KEYS if k not in batch]
  if missing:
    raise BatchContractError(f"batch is missing keys {missing}; it has {sorted(batch)}")
  for key in KEYS:
    kind = _kind(batch[key])
    want = _KINDS[key]
    ok = kind == want or (want == "i" and kind == "u") or (want == "f" and kind == "V")
    if not ok:
      raise BatchContractError(f"batch[{key!r}] has dtype {batch[key].dtype}; expected "
                               f"{ {'i': 'an integer', 'b': 'bool', 'f': 'a float'}[want]} dtype")
  shape = batch["tokens"].shape
  if len(shape) != 2:
    raise BatchContractError(f"batch['tokens'] must be [B, L], got shape {shape}")
  for key in TEXT_KEYS:
    if batch[key].shape != shape:
      raise BatchContractError(f"batch[{key!r}] has shape {batch[key].shape}; expected {shape} "
                               "like batch['tokens']")
  images = batch["images"].shape
  if len(images) != 5 or images[0] != shape[0]:
    raise BatchContractError(f"batch['images'] must be [B={shape[0]}, M, h, w, c], got {images}")
  if latent_shape is not None and tuple(images[2:]) != tuple(latent_shape):
    raise BatchContractError(f"batch['images'] holds latents of shape {images[2:]}; the model "
                             f"expects {tuple(latent_shape)} (config.model.image)")
  for key in ("image_mask", "image_max_t"):
    if batch[key].shape != images[:2]:
      raise BatchContractError(f"batch[{key!r}] has shape {batch[key].shape}; expected "
                               f"{images[:2]} ([B, M] like batch['images'])")
  return shape[0], shape[1], images[1]


def check_batch_values(batch, *, num_patches):
  """Checks the layout values of a host (numpy) batch.

  Every image span must be contiguous, hold exactly `num_patches` positions, point at a slot
  marked in `image_mask`, sit inside one document, and no slot may be used twice; the text loss
  must not apply on padding; latents of real images must be finite.
  """
  b_size, length, m_slots = check_batch_structure(batch)
  image_index = np.asarray(batch["image_index"])
  segment_ids = np.asarray(batch["segment_ids"])
  image_mask = np.asarray(batch["image_mask"])
  loss_mask = np.asarray(batch["text_loss_mask"])
  if (segment_ids < 0).any():
    raise BatchContractError("batch['segment_ids'] holds negative values (0 is padding)")
  if (image_index >= m_slots).any() or (image_index < -1).any():
    bad = np.argwhere((image_index >= m_slots) | (image_index < -1))[0]
    raise BatchContractError(f"batch['image_index'][{bad[0]}, {bad[1]}] = "
                             f"{image_index[tuple(bad)]} is outside [-1, M={m_slots})")
  if (loss_mask & (segment_ids == 0)).any():
    bad = np.argwhere(loss_mask & (segment_ids == 0))[0]
    raise BatchContractError(f"batch['text_loss_mask'] is set at padding position {tuple(bad)}")
  if (loss_mask & (image_index >= 0)).any():
    bad = np.argwhere(loss_mask & (image_index >= 0))[0]
    raise BatchContractError(f"batch['text_loss_mask'] is set at image patch position {tuple(bad)}")
  for row in range(b_size):
    idx = image_index[row]
    pos = np.flatnonzero(idx >= 0)
    if pos.size == 0:
      continue
    # Split into runs of equal slot over consecutive positions.
    breaks = np.flatnonzero((np.diff(pos) != 1) | (np.diff(idx[pos]) != 0)) + 1
    seen = set()
    for run in np.split(pos, breaks):
      slot = int(idx[run[0]])
      where = f"row {row}, positions {run[0]}..{run[-1]}"
      if slot in seen:
        raise BatchContractError(f"batch['image_index']: slot {slot} appears in two spans ({where})")
      seen.add(slot)
      if run.size != num_patches:
        raise BatchContractError(
            f"batch['image_index']: the span of slot {slot} ({where}) has {run.size} positions; "
            f"an image has {num_patches} patches")
      if not image_mask[row, slot]:
        raise BatchContractError(
            f"batch['image_index'] points at slot {slot} ({where}) but batch['image_mask'] "
            f"[{row}, {slot}] is False (empty slot)")
      if len(set(segment_ids[row, run].tolist())) != 1 or segment_ids[row, run[0]] == 0:
        raise BatchContractError(f"batch['segment_ids']: the image span ({where}) is not inside "
                                 "one document")
    unused = [m for m in range(m_slots) if image_mask[row, m] and m not in seen]
    if unused:
      raise BatchContractError(f"batch['image_mask'] marks slots {unused} of row {row} as real "
                               "images but no position refers to them")
  images = np.asarray(batch["images"], dtype=np.float32)
  if not np.isfinite(images[image_mask]).all():
    raise BatchContractError("batch['images'] holds NaN or Inf in a real image slot")
