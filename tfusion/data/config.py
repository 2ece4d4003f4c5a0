"""The `config.data` block: where training data comes from and how rows are packed."""

import ml_collections


def data_config():
  """Defaults for `config.data` (global batch of `batch_size` rows of `seq_len` positions)."""
  d = ml_collections.ConfigDict()
  d.source = "synthetic"  # synthetic (random documents, tfusion/data/synthetic.py) | grain
  d.batch_size = 8  # global rows per step (split over processes and the data axes)
  d.seq_len = 128  # L, positions per packed row
  d.max_images = 4  # M, image slots per row

  # source="grain": ArrayRecord files in the schema of tfusion/data/records.py. Each source is
  # comma-separated files, directories or globs; "" turns it off.
  d.tokenizer = ""  # SentencePiece .model (Llama 2's, or from tfusion-train-tokenizer)
  d.text = ""  # text documents
  d.image_caption = ""  # image–caption pairs (latents from tfusion-precompute-latents)
  d.interleaved = ""  # interleaved text and images
  # Mixture weights: shares of what each source packs, counted in positions for text and
  # interleaved documents and in image patches for image–caption pairs. 1:1 is the paper's
  # 1:1 text tokens to image patches (captions ride along with their images).
  d.text_weight = 1.0
  d.image_caption_weight = 1.0
  d.interleaved_weight = 1.0
  d.caption_first_prob = 0.8  # else image-first (captioning)
  d.caption_dropout = 0.1  # caption-first pairs without caption (classifier-free guidance)
  d.image_first_max_t = 0.5  # noise limiting for images that precede their caption
  d.on_bad_record = "error"  # error (names file and record) | skip (skipped, counted, logged)
  d.shuffle = True  # reshuffled every epoch from (seed, epoch)
  d.num_epochs = 0  # 0: repeat forever; k: stop after k passes over every source
  d.pack_pool = 64  # documents held open per source while packing (more: denser rows)
  # Which documents may be cut across rows (never inside an image): long = only those that fit
  # no row (> L positions or > M images); fill = also any text document, to fill rows to 100%.
  d.split_text = "long"
  d.worker_count = 0  # Grain worker processes (0: pack in this process)
  d.prefetch = 2  # batches prepared ahead in a background thread (0: none)
  return d
