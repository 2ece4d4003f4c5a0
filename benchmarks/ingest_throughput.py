"""Ingest throughput of tfusion-precompute-latents: webdataset tar shards and parquet -> latents.

Usage: python benchmarks/ingest_throughput.py                       # 512 images, 4 tar shards
       python benchmarks/ingest_throughput.py --images 4096 --tars 8 --batch_size 64

Makes N digits-sized samples in a temp dir (scikit-learn's 8x8 digits upscaled to 32x32 RGB PNGs,
as the demo's images, with a caption each), written as img2dataset-style tar shards
(000123.png + .txt + .json) and as one parquet file (HF datasets' image struct {bytes, path}),
then times `precompute` on each with the demo's VAE (random weights: the time does not depend
on their values) at resolution 32. Reported: the tar listing pass alone (headers only), and
images/s end to end (listing, reading, PNG decode, encode, writing shards) after a warm-up run
that compiles the encoder. The paper-size VAE cost is benchmarks/vae_encode_throughput.py's.
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from tfusion import vae as vae_lib
from tfusion.data import ingest_sources, precompute
from tfusion.demo import data as demo_data
from tfusion.vae.model import VAEConfig

DEMO_VAE = VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                     norm_num_groups=16, mid_block_add_attention=False)  # tfusion/demo
RESOLUTION = 32


def _samples(n):
  """n (png bytes, caption) from the demo's digits, cycled."""
  images8, labels = demo_data.digits()
  pictures = demo_data.upscale(images8[:min(n, len(images8))], RESOLUTION)
  out = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(pictures[i % len(pictures)]).save(buf, "PNG")
    out.append((buf.getvalue(), f"a handwritten digit {demo_data.WORDS[labels[i % len(labels)]]}"))
  return out


def write_tars(samples, folder, num_tars):
  """img2dataset layout: shard-NNNNN.tar holding KEY.png, KEY.txt, KEY.json."""
  per = -(-len(samples) // num_tars)
  for t in range(num_tars):
    with tarfile.open(os.path.join(folder, f"shard-{t:05d}.tar"), "w") as tar:
      for i in range(t * per, min(len(samples), (t + 1) * per)):
        png, caption = samples[i]
        meta = json.dumps({"caption": caption, "key": f"{i:09d}"}).encode()
        for ext, data in (("png", png), ("txt", caption.encode()), ("json", meta)):
          info = tarfile.TarInfo(f"{i:09d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))


def write_parquet(samples, path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"image": [{"bytes": png, "path": None} for png, _ in samples],
                    "caption": [c for _, c in samples]})
  pq.write_table(table, path, row_group_size=1000)


def _time(items, vae, out, args):
  t0 = time.perf_counter()
  summary = precompute.precompute(items, vae, out, resolution=RESOLUTION,
                                  batch_size=args.batch_size, shard_size=args.shard_size,
                                  show_progress=False)
  return summary, time.perf_counter() - t0


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--tars", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--shard_size", type=int, default=256)
  args = parser.parse_args()
  print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())} "
        f"({jax.default_backend()}); {os.cpu_count()} CPUs")
  vae = vae_lib.init_vae(DEMO_VAE)
  samples = _samples(args.images)
  with tempfile.TemporaryDirectory() as tmp:
    tars = os.path.join(tmp, "tars")
    os.makedirs(tars)
    write_tars(samples, tars, args.tars)
    write_parquet(samples, os.path.join(tmp, "data.parquet"))
    mib = sum(os.path.getsize(os.path.join(tars, f)) for f in os.listdir(tars)) / 2**20
    print(f"{args.images} digits PNGs {RESOLUTION}x{RESOLUTION}: {args.tars} tar shards "
          f"({mib:.1f} MiB), 1 parquet file; demo VAE, batch {args.batch_size}")
    # Warm-up: compiles the encoder for this batch size (reused by the timed runs).
    precompute.write_latent_records(np.zeros((2, 8, 8)), ["a", "b"], vae,
                                    os.path.join(tmp, "warm"), resolution=RESOLUTION,
                                    batch_size=args.batch_size)
    t0 = time.perf_counter()
    items = ingest_sources.WebDatasetItems(tars)
    list_s = time.perf_counter() - t0
    print(f"tar listing (headers only): {len(items) / list_s:.0f} samples/s "
          f"({list_s * 1000:.0f} ms for {len(items)})")
    summary, s = _time(items, vae, os.path.join(tmp, "out_tar"), args)
    print(f"tar:     {summary['written'] / s:.0f} images/s ({summary['written']} in {s:.2f} s)")
    items = ingest_sources.ParquetItems(os.path.join(tmp, "data.parquet"))
    summary, s = _time(items, vae, os.path.join(tmp, "out_parquet"), args)
    print(f"parquet: {summary['written'] / s:.0f} images/s ({summary['written']} in {s:.2f} s)")


if __name__ == "__main__":
  main()
