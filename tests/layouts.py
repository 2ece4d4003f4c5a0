"""Random packed rows per the batch contract, built the slow obvious way, for tests.

A row holds several documents; a document is a sequence of text runs and images (BOI, N patch
positions, EOI). Returns the contract's arrays plus the list of documents, so tests can check
the model's mask and loss against a position-by-position reading of the paper's rules.
"""

import numpy as np


def random_row(rng, length, num_slots, num_patches, vocab_size=100, max_docs=4):
  """One packed row: dict of contract arrays (no batch axis) + `docs` description."""
  tokens = np.zeros(length, np.int32)
  segment_ids = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  image_index = np.full(length, -1, np.int32)
  cursor, slot, docs = 0, 0, []
  for doc_id in range(1, rng.integers(1, max_docs + 1) + 1):
    start = cursor
    spans = []
    pieces = rng.integers(1, 5)
    for _ in range(pieces):
      if rng.random() < 0.5 and slot < num_slots and cursor + num_patches + 2 <= length:
        tokens[cursor] = 1  # BOI
        img_start = cursor + 1
        image_index[img_start:img_start + num_patches] = slot
        tokens[img_start + num_patches] = 2  # EOI
        spans.append(("image", img_start, img_start + num_patches, slot))
        slot += 1
        cursor = img_start + num_patches + 1
      else:
        n = int(rng.integers(1, 12))
        n = min(n, length - cursor)
        if n <= 0:
          break
        tokens[cursor:cursor + n] = rng.integers(3, vocab_size, n)
        spans.append(("text", cursor, cursor + n, None))
        cursor += n
      if cursor >= length:
        break
    if cursor == start:
      break
    segment_ids[start:cursor] = doc_id
    positions[start:cursor] = np.arange(cursor - start)
    docs.append((doc_id, start, cursor, spans))
    if cursor >= length or rng.random() < 0.2:
      break
  return dict(tokens=tokens, segment_ids=segment_ids, positions=positions,
              image_index=image_index, num_images=slot, docs=docs)


def random_batch(rng, batch, length, num_slots, latent_shape, patch_size, vocab_size=100):
  """A contract batch of random packed rows with random latents. Returns (batch dict, rows)."""
  h, w, c = latent_shape
  num_patches = (h // patch_size) * (w // patch_size)
  rows = [random_row(rng, length, num_slots, num_patches, vocab_size) for _ in range(batch)]
  stack = lambda key: np.stack([r[key] for r in rows])
  tokens, segment_ids, image_index = stack("tokens"), stack("segment_ids"), stack("image_index")
  # Next-token targets inside a document; loss where input is text (not BOI) and next is text.
  nxt_tokens = np.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  nxt_seg = np.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
  nxt_img = np.pad(image_index[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
  is_text = (image_index < 0) & (segment_ids > 0)
  loss_mask = is_text & (tokens != 1) & (nxt_seg == segment_ids) & (nxt_img < 0)
  image_mask = np.zeros((batch, num_slots), bool)
  for i, r in enumerate(rows):
    image_mask[i, :r["num_images"]] = True
  images = rng.standard_normal((batch, num_slots, h, w, c)).astype(np.float32)
  images[~image_mask] = 0.0
  max_t = np.where(rng.random((batch, num_slots)) < 0.2, 0.5, 1.0).astype(np.float32)
  out = dict(tokens=tokens, targets=np.where(loss_mask, nxt_tokens, 0).astype(np.int32),
             text_loss_mask=loss_mask, segment_ids=segment_ids, positions=stack("positions"),
             image_index=image_index, images=images, image_mask=image_mask, image_max_t=max_t)
  return out, rows


def brute_force_mask(row, length, intra_image="bidirectional"):
  """The paper's rule read literally, position by position. -> bool [L, L]."""
  allowed = np.zeros((length, length), bool)
  for _, start, end, spans in row["docs"]:
    image_end = {}
    for kind, s, e, _ in spans:
      if kind == "image":
        for p in range(s, e):
          image_end[p] = e - 1
    for q in range(start, end):
      for k in range(start, end):
        if k <= q:
          allowed[q, k] = True  # causal: everything earlier in the same document
        elif intra_image == "bidirectional" and q in image_end and k <= image_end[q]:
          allowed[q, k] = True  # a patch sees the rest of its own image
  return allowed
