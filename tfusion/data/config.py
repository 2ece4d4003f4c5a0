"""The `config.data` block: where training data comes from and how rows are packed."""

import ml_collections


def data_config():
  """Defaults for `config.data` (global batch of `batch_size` rows of `seq_len` positions)."""
  d = ml_collections.ConfigDict()
  d.source = "synthetic"  # synthetic (random documents, tfusion/data/synthetic.py) | grain
  d.batch_size = 8  # global rows per step (split over processes and the data axes)
  d.seq_len = 128  # L, positions per packed row
  d.max_images = 4  # M, image slots per row
  return d
