"""Data pipeline throughput and packing efficiency on one CPU core.

The default mix of the paper: text documents and image–caption pairs, 1:1 text tokens to
image patches, rows of L=4096 with 256-patch images (latents 32x32x8, patch 2). Text is
CPython's standard library sources and pydoc pages (raw text, tokenized in the pipeline by a
BPE tokenizer trained on them); latents are random float16. The whole pipeline runs: ArrayRecord
reads, record validation, tokenization, mixing, packing, batch assembly.

  python benchmarks/data_packing.py [--split_text fill|long] [--pretokenized] [--doc_chars N]

Reports packed positions per second of wall time and per CPU second of this process (pinned to
one core), the non-padding fraction, the positions that carry a text loss, the text:patch
ratio and images per row. Targets (issue 3): >= 200k positions/s/core, >= 97% non-padding.
"""

import argparse
import os
import time

import numpy as np

from tfusion import batch as batch_lib
from tfusion import configlib
from tfusion.data import pipeline, records, samples


def rechunk(texts, chars):
  """Cuts documents at paragraph breaks into documents of about `chars` characters."""
  out = []
  for name, text in texts:
    doc, n = [], 0
    for para in text.split("\n\n"):
      doc.append(para)
      n += len(para)
      if n >= chars:
        out.append((f"{name}:{len(out)}", "\n\n".join(doc)))
        doc, n = [], 0
    if doc and "".join(doc).strip():
      out.append((f"{name}:{len(out)}", "\n\n".join(doc)))
  return out


def make_data(workdir, images, latent_shape, pretokenized, doc_chars):
  texts = samples.stdlib_sources() + samples.pydoc_topics()
  tok = samples.sample_tokenizer(workdir, 8000, texts=texts)
  if doc_chars:
    texts = rechunk(texts, doc_chars)
  text_path = os.path.join(workdir, f"text{'_ids' if pretokenized else ''}_{doc_chars}"
                           f"{records.EXTENSION}")
  if not os.path.exists(text_path):
    samples.write_text_records(text_path, texts, pretokenize_with=tok if pretokenized else None)
  shape_tag = "x".join(map(str, latent_shape))
  image_path = os.path.join(workdir, f"images_{shape_tag}_{images}.array_record")
  if not os.path.exists(image_path):
    samples.write_image_caption_records(image_path, images, latent_shape)
  return tok, text_path, image_path, texts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/tfusion_data_bench",
                      help="cache for the tokenizer and records")
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--max_images", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--latent_size", type=int, default=32)
  parser.add_argument("--latent_channels", type=int, default=8)
  parser.add_argument("--patch_size", type=int, default=2)
  parser.add_argument("--images", type=int, default=3000, help="image–caption records")
  parser.add_argument("--split_text", default="long", choices=["fill", "long"])
  parser.add_argument("--pretokenized", action="store_true", help="text records hold ids")
  parser.add_argument("--doc_chars", type=int, default=0,
                      help="re-cut the text into documents of about this many characters "
                           "(0: whole source files; 2000 is about web-page length)")
  parser.add_argument("--pack_pool", type=int, default=64, help="open documents per source")
  parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (-1: no pinning)")
  args = parser.parse_args()

  if args.core >= 0 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {args.core})
  latent_shape = (args.latent_size, args.latent_size, args.latent_channels)
  tok, text_path, image_path, texts = make_data(args.workdir, args.images, latent_shape,
                                                args.pretokenized, args.doc_chars)
  config = configlib.base_config()
  config.model.vocab_size = 8192
  config.model.image.latent_size = args.latent_size
  config.model.image.latent_channels = args.latent_channels
  config.model.image.patch_size = args.patch_size
  d = config.data
  d.source = "grain"
  d.tokenizer = tok.source
  d.text, d.image_caption = text_path, image_path
  d.seq_len, d.max_images, d.batch_size = args.seq_len, args.max_images, args.batch_size
  d.split_text = args.split_text
  d.pack_pool = args.pack_pool
  d.prefetch = 0  # measure the packing work itself, in this thread
  num_patches = (args.latent_size // args.patch_size) ** 2

  it = pipeline.make_iterator(config)
  for _ in range(3):  # warm-up: pools filled, files opened
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  batches = [next(it) for _ in range(args.batches)]
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  for b in batches[:3]:
    batch_lib.check_batch_values(b, num_patches=num_patches)

  positions = args.batches * args.batch_size * args.seq_len
  seg = np.stack([b["segment_ids"] for b in batches])
  idx = np.stack([b["image_index"] for b in batches])
  loss = np.stack([b["text_loss_mask"] for b in batches])
  text = ((seg > 0) & (idx < 0)).sum()
  patches = (idx >= 0).sum()
  docs_per_row = np.mean([s.max(axis=1).mean() for s in seg])
  lengths = np.array([len(t) for _, t in texts])
  print(f"mix: text ({len(texts)} docs, median {np.median(lengths) / 1e3:.1f}k chars, "
        f"{'ids' if args.pretokenized else 'raw text'}) + {args.images} image–caption pairs "
        f"(latents {latent_shape}, {num_patches} patches); L={args.seq_len} M={args.max_images} "
        f"B={args.batch_size} split_text={args.split_text} pack_pool={args.pack_pool}")
  print(f"packed positions/s: {positions / wall:,.0f} (wall)  {positions / cpu:,.0f} "
        f"(per CPU second)  over {args.batches} batches")
  print(f"non-padding: {(seg > 0).mean() * 100:.2f}%  text-loss positions: "
        f"{loss.mean() * 100:.1f}%  text:patch = {text / max(patches, 1):.3f}  images/row: "
        f"{np.mean([b['image_mask'].sum(1).mean() for b in batches]):.2f}  documents/row: "
        f"{docs_per_row:.1f}")


if __name__ == "__main__":
  main()
