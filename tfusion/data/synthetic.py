"""Synthetic training data per the batch contract, for smoke tests and benchmarks.

Rows pack random documents: BOS, runs of random text and images (BOI, N patch positions, EOI),
EOS; the rest of the row is padding. Every row is generated from (seed, step, global row), so
any process can produce exactly its own rows and a resumed run sees the same batches.
Token ids: 1 BOS, 2 EOS, 3 BOI, 4 EOI, text in [5, vocab_size).
"""

import numpy as np

BOS, EOS, BOI, EOI = 1, 2, 3, 4


def make_row(rng, length, num_slots, latent_shape, patch_size, vocab_size):
  """One packed row (dict of arrays without the batch axis)."""
  h, w, c = latent_shape
  n = (h // patch_size) * (w // patch_size)
  tokens = np.zeros(length, np.int32)
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  image_index = np.full(length, -1, np.int32)
  images = np.zeros((num_slots, h, w, c), np.float32)
  image_mask = np.zeros(num_slots, bool)
  image_max_t = np.ones(num_slots, np.float32)
  cursor, slot, doc = 0, 0, 0
  while cursor < length - 2 and rng.random() < 0.9:
    doc += 1
    start = cursor
    seq = [BOS]
    spans = []  # (offset in seq, slot)
    image_first = rng.random() < 0.2
    for piece in range(rng.integers(1, 4)):
      wants_image = (image_first and piece == 0) or rng.random() < 0.5
      if wants_image and slot < num_slots and start + len(seq) + n + 3 <= length:
        seq.append(BOI)
        spans.append((len(seq), slot))
        image_max_t[slot] = 0.5 if (image_first and piece == 0) else 1.0
        seq.extend([0] * n)
        seq.append(EOI)
        slot += 1
      else:
        seq.extend(rng.integers(5, vocab_size, rng.integers(1, 24)).tolist())
    seq.append(EOS)
    seq = seq[:length - start]  # only text is cut: an image is added only where it fits
    end = start + len(seq)
    tokens[start:end] = seq
    segment_ids[start:end] = doc
    positions[start:end] = np.arange(len(seq))
    for off, s in spans:
      image_index[start + off:start + off + n] = s
      images[s] = rng.standard_normal((h, w, c))
      image_mask[s] = True
    cursor = end
  tokens[image_index >= 0] = 0
  nxt_seg = np.append(segment_ids[1:], 0)
  nxt_img = np.append(image_index[1:], -1)
  is_text = (image_index < 0) & (segment_ids > 0)
  loss_mask = is_text & (tokens != BOI) & (nxt_seg == segment_ids) & (nxt_img < 0)
  targets = np.where(loss_mask, np.append(tokens[1:], 0), 0).astype(np.int32)
  return dict(tokens=tokens, targets=targets, text_loss_mask=loss_mask, segment_ids=segment_ids,
              positions=positions, image_index=image_index, images=images,
              image_mask=image_mask, image_max_t=image_max_t)


class SyntheticIterator:
  """Iterator protocol of the training job: next() -> this process's rows; get/set_state."""

  def __init__(self, config, *, row_start, row_count):
    img = config.model.image
    self._args = (config.data.seq_len, config.data.max_images,
                  (img.latent_size, img.latent_size, img.latent_channels), img.patch_size,
                  config.model.vocab_size)
    self._seed = config.seed
    self._rows = range(row_start, row_start + row_count)
    self._step = 0

  def __iter__(self):
    return self

  def __next__(self):
    rows = [make_row(np.random.default_rng([self._seed, self._step, r]), *self._args)
            for r in self._rows]
    self._step += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def get_state(self):
    return {"step": self._step}

  def set_state(self, state):
    self._step = int(state["step"])
