"""Packing invariants on random documents, checked against the documents themselves.

Every packed row is read back position by position through the pieces the packer chose and
compared with the documents it was given: tokens, positions, images (never split), targets
and loss mask, and the paper's attention rule (written here from the documents) against
`attention_mask(segment_ids, image_index)`.
"""

import jax
import numpy as np
import pytest

from tfusion import batch as batch_lib
from tfusion.data import packing
from tfusion.data.documents import Document
from tfusion.model import attention

BOS, EOS, BOI, EOI = 1, 2, 3, 4


def random_document(rng, num_patches, latent_shape, *, max_text=40, max_pieces=5):
  """BOS, random text runs and images, EOS; sometimes long (> L) or image-heavy."""
  tokens, starts, latents, max_t = [BOS], [], [], []
  long_doc = rng.random() < 0.1
  for _ in range(rng.integers(1, max_pieces + 1) * (6 if long_doc else 1)):
    if rng.random() < 0.4:
      tokens.append(BOI)
      starts.append(len(tokens))
      tokens.extend([0] * num_patches)
      tokens.append(EOI)
      latents.append(rng.standard_normal(latent_shape).astype(np.float16))
      max_t.append(rng.choice([0.5, 1.0]))
    else:
      tokens.extend(rng.integers(5, 100, rng.integers(1, max_text * (4 if long_doc else 1))))
  tokens.append(EOS)
  lat = np.stack(latents) if latents else np.zeros((0,) + latent_shape, np.float16)
  return Document(np.asarray(tokens, np.int32), np.asarray(starts, np.int32), lat,
                  np.asarray(max_t, np.float32))


def pack_all(packer, streams, rows=4):
  """Packs every document of the streams; returns [(batch, pieces)]."""
  iters = [iter(s) for s in streams]
  pulls = [lambda it=it: next(it, None) for it in iters]
  out = []
  while True:
    batch, pieces = packer.next_rows(rows, pulls)
    if batch is None:
      return out
    out.append((batch, pieces))


def expected_row(pieces, length, num_patches):
  """Per position: (piece, doc, doc position); from the documents only."""
  where = [None] * length
  p = 0
  for k, (doc, start, end) in enumerate(pieces):
    for j in range(start, end):
      where[p] = (k, doc, j)
      p += 1
  return where


def image_of(doc, j, num_patches):
  """(image number, first, last doc position of its patches) if doc position j is a patch."""
  for m, s in enumerate(doc.image_starts):
    if s <= j < s + num_patches:
      return m, s, s + num_patches - 1
  return None


def paper_mask(where, num_patches):
  """The paper's rule from the documents: causal text; a patch also sees the rest of its own
  image; nothing across documents (pieces) or into padding."""
  length = len(where)
  mask = np.zeros((length, length), bool)
  for q in range(length):
    if where[q] is None:
      continue
    kq, doc, jq = where[q]
    img = image_of(doc, jq, num_patches)
    for k in range(length):
      if where[k] is None or where[k][0] != kq:
        continue
      jk = where[k][2]
      mask[q, k] = jk <= jq or (img is not None and img[1] <= jk <= img[2])
  return mask


CASES = [  # (L, M, N, split_text, weights)
    (64, 3, 4, "fill", (1.0,)),
    (64, 2, 9, "long", (1.0,)),
    (96, 4, 4, "fill", (1.0, 2.0)),
    (48, 1, 16, "fill", (1.0,)),
]


@pytest.mark.parametrize("length,slots,num_patches,split_text,weights", CASES)
def test_packed_rows_reproduce_the_documents_and_the_paper_mask(length, slots, num_patches,
                                                                split_text, weights):
  rng = np.random.default_rng(length + slots + num_patches)
  latent_shape = (2 * int(np.sqrt(num_patches)), 2 * int(np.sqrt(num_patches)), 2)
  streams = [[random_document(rng, num_patches, latent_shape) for _ in range(40)]
             for _ in weights]
  packer = packing.Packer(length, slots, latent_shape, num_patches, weights=weights,
                          pool_size=6, split_text=split_text)
  packed = pack_all(packer, streams)
  seen = {id(d): [] for s in streams for d in s}
  mask_fn = jax.jit(attention.attention_mask)
  for batch, rows in packed:
    batch_lib.check_batch_values(batch, num_patches=num_patches)
    got_mask = np.asarray(mask_fn(batch["segment_ids"], batch["image_index"]))
    for r, pieces in enumerate(rows):
      where = expected_row(pieces, length, num_patches)
      np.testing.assert_array_equal(got_mask[r], paper_mask(where, num_patches))
      slot = 0
      for k, (doc, start, end) in enumerate(pieces):
        seen[id(doc)].append((start, end))
        # A cut never falls inside an image (BOI, patches, EOI stay together).
        for s in doc.image_starts:
          assert not s - 1 < start <= s + num_patches, "piece starts inside an image"
          assert not s - 1 < end <= s + num_patches, "piece ends inside an image"
        for m, s in enumerate(doc.image_starts):
          if start <= s < end:
            np.testing.assert_array_equal(batch["images"][r, slot], doc.latents[m])
            assert batch["image_max_t"][r, slot] == doc.max_t[m]
            slot += 1
      assert batch["image_mask"][r].sum() == slot
      for q in range(length):
        if where[q] is None:
          assert batch["segment_ids"][r, q] == 0 and not batch["text_loss_mask"][r, q]
          continue
        k, doc, j = where[q]
        start = pieces[k][1]
        assert batch["segment_ids"][r, q] == k + 1
        assert batch["positions"][r, q] == j - start  # restarts in each row
        is_patch = image_of(doc, j, num_patches) is not None
        assert batch["tokens"][r, q] == (0 if is_patch else doc.tokens[j])
        assert (batch["image_index"][r, q] >= 0) == is_patch
        nxt_in_piece = q + 1 < length and where[q + 1] is not None and where[q + 1][0] == k
        want_loss = (not is_patch and doc.tokens[j] != BOI and nxt_in_piece
                     and image_of(doc, j + 1, num_patches) is None)
        assert batch["text_loss_mask"][r, q] == want_loss, (r, q)
        assert batch["targets"][r, q] == (doc.tokens[j + 1] if want_loss else 0)
  # Every document is packed exactly once, in order, in pieces that tile it.
  for stream in streams:
    for doc in stream:
      spans = seen[id(doc)]
      assert spans[0][0] == 0 and spans[-1][1] == len(doc)
      assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
      fits_row = len(doc) <= length and doc.num_images <= slots
      if fits_row and (split_text == "long" or doc.num_images):
        assert len(spans) == 1, "a document that fits a row was split"


@pytest.mark.parametrize("split_text,density", [("fill", 0.995), ("long", 0.97)])
def test_packing_is_dense_and_follows_the_weights(split_text, density):
  rng = np.random.default_rng(0)
  n, shape, length = 16, (8, 8, 2), 512
  text = [Document(np.concatenate([[BOS], rng.integers(5, 100, rng.integers(1, 300)), [EOS]])
                   .astype(np.int32), np.zeros(0, np.int32), np.zeros((0,) + shape), np.ones(0))
          for _ in range(2000)]
  images = []
  for _ in range(1500):  # caption + image documents
    cap = rng.integers(5, 100, rng.integers(3, 12))
    tokens = np.concatenate([[BOS], cap, [BOI], np.zeros(n, np.int32), [EOI, EOS]])
    images.append(Document(tokens.astype(np.int32), np.array([len(cap) + 2], np.int32),
                           rng.standard_normal((1,) + shape).astype(np.float16),
                           np.ones(1, np.float32)))
  for weights in [(1.0, 1.0), (3.0, 1.0)]:
    packer = packing.Packer(length, 16, shape, n, weights=weights,
                            measures=["positions", "patches"], split_text=split_text)
    iters = [iter(text), iter(images)]
    pulls = [lambda it=it: next(it, None) for it in iters]
    batches = [packer.next_rows(8, pulls)[0] for _ in range(10)]
    seg = np.stack([b["segment_ids"] for b in batches])
    idx = np.stack([b["image_index"] for b in batches])
    nonpad = (seg > 0).mean()
    assert nonpad > density, nonpad
    ratio = packer.packed[0] / packer.packed[1]
    assert abs(ratio / (weights[0] / weights[1]) - 1) < 0.05, (weights, ratio)
    assert packer.packed[1] == (idx >= 0).sum()  # image source counts its patches
    print(f"{split_text} weights {weights}: non-padding {nonpad:.4f}, "
          f"text-source tokens:patches {ratio:.3f}")


def test_image_larger_than_a_row_is_a_clear_error():
  with pytest.raises(ValueError, match="seq_len=16"):
    packing.Packer(16, 2, (8, 8, 4), 16)
  with pytest.raises(ValueError, match="split_text"):
    packing.Packer(64, 2, (8, 8, 4), 16, split_text="always")
