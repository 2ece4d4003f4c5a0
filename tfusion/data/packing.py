"""Packing documents into rows of L positions with up to M images, per the batch contract.

Documents arrive from one or more sources (text, image–caption, ...), each into its own pool
of open documents kept in arrival order. A row is filled one piece at a time: the source
furthest behind its share (`weights`) of what has been packed goes next and places its oldest
document that can go in — whole if it fits (length and free image slots), otherwise cut at
the last position that fits if the document may be cut. Cuts never fall inside BOI..EOI, so
an image is never split. Documents that fit no row at all (longer than L or with more than M
images) may always be cut; with `split_text="fill"` so may every pure-text document (rows come
out full), with `split_text="long"` a document that fits one row is always placed whole.
The tail of a cut document keeps its place in the pool and, in the row it lands in, starts at
position 0 (RoPE positions restart; it cannot attend to its earlier part anyway).

A source's packed amount is counted in positions, or in image patches for sources marked
"patches" (image–caption pairs: the paper's mix is 1:1 text tokens to image patches).
With `discrete=True` (VQ image tokens, tfusion/discrete.py) an image is n ordinary tokens
between BOI and EOI: it is never cut either, a "patches" source counts its n image tokens per
image (1:1 text tokens to image tokens; captions, BOI and EOI ride along, as with patches), rows
have no image slots (images [B, 0, h, w, 1], image_index -1 everywhere) and the LM loss covers
every next token of a document, BOI -> c_1 and c_n -> EOI included.
Balancing what is packed (not what is pulled) keeps every stretch of rows close to the
weights: two sources never drift apart by more than about one row.
All per-position work is numpy slicing; Python runs per document, not per token.
"""

import bisect

import numpy as np

SPLIT_TEXT_CHOICES = ("fill", "long")


class PoolEntry:
  """A document in a pool and how much of it is already packed (`offset`)."""

  __slots__ = ("doc", "offset", "ends", "bois")

  def __init__(self, doc, offset=0, *, num_patches):
    self.doc = doc
    self.offset = offset
    self.bois = (doc.image_starts - 1).tolist()  # BOI positions
    self.ends = (doc.image_starts + num_patches + 1).tolist()  # one past each EOI

  def remaining(self):
    return len(self.doc) - self.offset

  def remaining_images(self):
    return len(self.bois) - bisect.bisect_left(self.bois, self.offset)


class Packer:
  """Fills rows from document sources; pools and packed counts are its state.

  Args:
    seq_len: L. max_images: M. latent_shape: (h, w, c). num_patches: N patches per image.
    weights: share of the packed amount per source.
    measures: per source, "positions" or "patches" (what its packed amount counts).
    pool_size: documents kept open per source (more: denser rows, more memory).
    split_text: "fill" | "long" (see module docstring).
  """

  def __init__(self, seq_len, max_images, latent_shape, num_patches, *, weights=(1.0,),
               measures=None, pool_size=64, split_text="long", discrete=False):
    if split_text not in SPLIT_TEXT_CHOICES:
      raise ValueError(f"config.data.split_text must be one of {SPLIT_TEXT_CHOICES}, got "
                       f"{split_text!r}")
    if num_patches + 2 > seq_len:
      raise ValueError(f"an image takes {num_patches} + 2 positions (BOI, patches, EOI), more "
                       f"than config.data.seq_len={seq_len}")
    if not weights or min(weights) <= 0:
      raise ValueError(f"source weights must be positive, got {list(weights)}")
    self.seq_len = seq_len
    self.discrete = bool(discrete)
    # Discrete images are tokens: no slot limit (every image of a row fits its positions).
    self.max_images = seq_len if self.discrete else max_images
    self.latent_shape = tuple(latent_shape)
    self.num_patches = num_patches
    self.weights = [float(w) for w in weights]
    measures = list(measures or ["positions"] * len(weights))
    if len(measures) != len(weights) or not set(measures) <= {"positions", "patches"}:
      raise ValueError(f"measures must be 'positions' or 'patches' per source, got {measures}")
    self.count_patches = [m == "patches" for m in measures]
    self.pool_size = pool_size
    self.split_text = split_text
    self.pools = [[] for _ in weights]
    self.packed = [0] * len(weights)  # amount packed per source (positions or patches)
    self.exhausted = [False] * len(weights)
    self._arange = np.arange(seq_len, dtype=np.int32)

  # -- pools --------------------------------------------------------------------------------

  def add(self, source, doc, offset=0):
    self.pools[source].append(PoolEntry(doc, offset, num_patches=self.num_patches))

  def _refill(self, source, pull):
    pool = self.pools[source]
    while len(pool) < self.pool_size and not self.exhausted[source]:
      doc = pull()
      if doc is None:
        self.exhausted[source] = True
      else:
        self.add(source, doc)

  def fits_empty_row(self, entry):
    return entry.remaining() <= self.seq_len and entry.remaining_images() <= self.max_images

  def _may_cut(self, entry):
    if not self.fits_empty_row(entry):
      return True
    return self.split_text == "fill" and not entry.bois

  def _cut(self, entry, room, slots):
    """The largest end c <= offset + room of a head [offset, c) that splits no image and
    holds at most `slots` images."""
    off = entry.offset
    c = min(off + room, len(entry.doc))
    bois, ends = entry.bois, entry.ends
    j = bisect.bisect_right(ends, c)  # images ending at or before c
    if j < len(bois) and bois[j] < c:  # c falls inside image j: cut before its BOI
      c = bois[j]
    first = bisect.bisect_left(bois, off)
    if bisect.bisect_right(ends, c) - first > slots:
      c = bois[first + slots]
    return c

  def _take(self, source, room, slots):
    """The piece (entry, end) the source places next, or None if nothing of it fits."""
    for e in self.pools[source]:
      n = e.remaining()
      if n <= room and e.remaining_images() <= slots:
        return e, len(e.doc)
      if self._may_cut(e):
        c = self._cut(e, room, slots)
        if c - e.offset >= 2:  # a one-token head has no target: leave the position empty
          return e, c
    return None

  # -- rows ---------------------------------------------------------------------------------

  def fill_row(self, pulls):
    """Chooses the pieces of one row.

    Args:
      pulls: per source, a callable () -> next Document, or None when the source is done.
    Returns:
      list of (doc, start, end) pieces in row order; empty when everything is packed.
    """
    room, slots = self.seq_len, self.max_images
    pieces = []
    sources = range(len(self.pools))
    while room > 1:
      for s in sources:
        self._refill(s, pulls[s])
      order = sorted(sources, key=lambda s: (self.packed[s] / self.weights[s], s))
      for s in order:
        taken = self._take(s, room, slots)
        if taken is None:
          continue
        e, end = taken
        pieces.append((e.doc, e.offset, end))
        images = bisect.bisect_right(e.ends, end) - bisect.bisect_left(e.bois, e.offset)
        room -= end - e.offset
        slots -= images
        self.packed[s] += images * self.num_patches if self.count_patches[s] else end - e.offset
        e.offset = end
        if end == len(e.doc):
          self.pools[s].remove(e)
        break
      else:
        break  # no source has anything that fits
    return pieces

  def write_rows(self, rows_pieces):
    """Pieces of B rows -> the contract's arrays (dict of numpy, leading dim B)."""
    b, length, m = len(rows_pieces), self.seq_len, self.max_images
    n = self.num_patches
    tokens = np.zeros((b, length), np.int32)
    segment_ids = np.zeros((b, length), np.int32)
    positions = np.zeros((b, length), np.int32)
    image_index = np.full((b, length), -1, np.int32)
    if self.discrete:
      m = 0
      images = np.zeros((b, 0, *self.latent_shape[:2], 1), np.float32)
    else:
      images = np.zeros((b, m) + self.latent_shape, np.float32)
    image_mask = np.zeros((b, m), bool)
    image_max_t = np.ones((b, m), np.float32)
    for r, pieces in enumerate(rows_pieces):
      if not pieces:
        continue
      lengths = [end - start for _, start, end in pieces]
      used = sum(lengths)
      tokens[r, :used] = np.concatenate([d.tokens[s:e] for d, s, e in pieces])
      segment_ids[r, :used] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
      starts = np.cumsum([0] + lengths[:-1])
      positions[r, :used] = self._arange[:used] - np.repeat(starts, lengths)
      slot = 0
      for (doc, s, e), at in zip(pieces, starts):
        if self.discrete or not doc.image_starts.size:
          continue
        lo = bisect.bisect_left(doc.image_starts.tolist(), s)
        for j in range(lo, doc.num_images):
          first = int(doc.image_starts[j])
          if first >= e:
            break
          p = at + first - s
          image_index[r, p:p + n] = slot
          images[r, slot] = doc.latents[j]
          image_mask[r, slot] = True
          image_max_t[r, slot] = doc.max_t[j]
          slot += 1
    return finish_rows(tokens=tokens, segment_ids=segment_ids, positions=positions,
                       image_index=image_index, images=images, image_mask=image_mask,
                       image_max_t=image_max_t)

  def next_rows(self, rows, pulls):
    """B packed rows (dict of arrays) and their pieces, or (None, None) when all is packed."""
    pieces = [self.fill_row(pulls) for _ in range(rows)]
    if not pieces[0]:
      return None, None
    return self.write_rows(pieces), pieces


def finish_rows(*, tokens, segment_ids, positions, image_index, images, image_mask,
                image_max_t):
  """Adds targets and text_loss_mask (the contract's rule) to a layout. Arrays [B, L].

  The LM loss applies where the input is text (not an image patch, not padding, not BOI) and
  the next position is text of the same document; the target is that next token.
  """
  tokens = np.where(image_index >= 0, 0, tokens).astype(np.int32)
  nxt_tok = np.zeros_like(tokens)
  nxt_tok[:, :-1] = tokens[:, 1:]
  nxt_seg = np.zeros_like(segment_ids)
  nxt_seg[:, :-1] = segment_ids[:, 1:]
  nxt_img = np.full_like(image_index, -1)
  nxt_img[:, :-1] = image_index[:, 1:]
  is_text = (segment_ids > 0) & (image_index < 0)
  # BOI is the only text token followed by a patch; the patch check excludes it.
  loss = is_text & (nxt_seg == segment_ids) & (nxt_img < 0)
  targets = np.where(loss, nxt_tok, 0).astype(np.int32)
  return dict(tokens=tokens, targets=targets, text_loss_mask=loss, segment_ids=segment_ids,
              positions=positions, image_index=image_index, images=images,
              image_mask=image_mask, image_max_t=image_max_t)
