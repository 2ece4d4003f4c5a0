"""The synthetic source follows the contract, is deterministic, and splits over processes."""

import numpy as np

from tfusion import batch as batch_lib
from tfusion import configlib
from tfusion.data import synthetic


def test_batches_follow_the_contract_and_resume():
  config = configlib.base_config()
  it = synthetic.SyntheticIterator(config, row_start=0, row_count=8)
  batches = [next(it) for _ in range(5)]
  for b in batches:
    batch_lib.check_batch_values(b, num_patches=16)
  assert sum(b["image_mask"].sum() for b in batches) > 10
  assert any((b["image_max_t"] == 0.5).any() for b in batches)  # image-first documents
  assert np.mean([(b["segment_ids"] > 0).mean() for b in batches]) > 0.5
  again = synthetic.SyntheticIterator(config, row_start=0, row_count=8)
  again.set_state(it.get_state())
  it2 = synthetic.SyntheticIterator(config, row_start=0, row_count=8)
  for _ in range(5):
    next(it2)
  expected = next(it2)
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, expected[k])


def test_process_shares_concatenate_to_the_global_batch():
  config = configlib.base_config()
  whole = next(synthetic.SyntheticIterator(config, row_start=0, row_count=8))
  parts = [next(synthetic.SyntheticIterator(config, row_start=r, row_count=4)) for r in (0, 4)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
