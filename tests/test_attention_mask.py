"""The attention mask equals a position-by-position reading of the paper's rule."""

import jax
import numpy as np
import pytest

import layouts
from tfusion.model import attention, layout


@pytest.mark.parametrize("intra_image", ["bidirectional", "causal"])
@pytest.mark.parametrize("num_patches", [1, 4, 9])
def test_mask_matches_brute_force_on_random_packed_rows(intra_image, num_patches):
  rng = np.random.default_rng(num_patches)
  length, rows = 64, 40
  packed = [layouts.random_row(rng, length, num_slots=6, num_patches=num_patches)
            for _ in range(rows)]
  seg = np.stack([r["segment_ids"] for r in packed])
  idx = np.stack([r["image_index"] for r in packed])
  got = np.asarray(jax.jit(attention.attention_mask, static_argnames="intra_image")(
      seg, idx, intra_image=intra_image))
  assert sum(r["num_images"] > 1 for r in packed) > 5, "layouts should hold several images"
  assert sum(len(r["docs"]) > 1 for r in packed) > 5, "layouts should hold several documents"
  for i, row in enumerate(packed):
    want = layouts.brute_force_mask(row, length, intra_image)
    np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}")


def test_query_rows_mask_is_a_slice_of_the_full_mask():
  rng = np.random.default_rng(0)
  row = layouts.random_row(rng, 48, num_slots=4, num_patches=4)
  seg, idx = row["segment_ids"][None], row["image_index"][None]
  full = attention.attention_mask(seg, idx)
  for start, size in [(0, 1), (5, 7), (40, 8)]:
    part = attention.query_rows_mask(seg, idx, start, size)
    np.testing.assert_array_equal(part, full[:, start:start + size])


def test_layout_helpers():
  idx = np.array([[-1, 0, 0, 0, -1, 1, 1, 2, 2, -1]])
  np.testing.assert_array_equal(layout.patch_numbers(idx)[0], [-1, 0, 1, 2, -1, 0, 1, 0, 1, -1])
  np.testing.assert_array_equal(layout.span_ends(idx)[0], [0, 3, 3, 3, 4, 6, 6, 8, 8, 9])
  np.testing.assert_array_equal(layout.span_starts(idx)[0], [0, 1, 1, 1, 4, 5, 5, 7, 7, 9])


def test_unknown_intra_image_is_an_error():
  with pytest.raises(ValueError, match="intra_image"):
    attention.attention_mask(np.ones((1, 4), np.int32), -np.ones((1, 4), np.int32),
                             intra_image="bidirectinal")


def test_jax_attention_matches_dense_reference():
  rng = np.random.default_rng(1)
  row = layouts.random_row(rng, 32, num_slots=3, num_patches=4)
  mask = attention.attention_mask(row["segment_ids"][None], row["image_index"][None])
  q = rng.standard_normal((1, 32, 4, 8)).astype(np.float32)
  k = rng.standard_normal((1, 32, 2, 8)).astype(np.float32)
  v = rng.standard_normal((1, 32, 2, 8)).astype(np.float32)
  dense = attention.dot_product_attention(q, k, v, mask, implementation="dense")
  fast = attention.dot_product_attention(q, k, v, mask, implementation="jax")
  keep = row["segment_ids"] > 0  # padding queries have no allowed key: output unspecified
  np.testing.assert_allclose(np.asarray(fast)[0, keep], np.asarray(dense)[0, keep],
                             atol=2e-5, rtol=1e-5)
