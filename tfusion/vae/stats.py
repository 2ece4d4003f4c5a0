"""Per-channel latent statistics for normalization: `tfusion-vae-stats --vae DIR --images DIR`.

Encodes a sample of your images with the VAE (posterior means), and writes their per-channel
mean and std to DIR/tfusion_latent_stats.json; `load_vae` then normalizes latents to zero mean
and unit variance per channel (instead of diffusers' single scaling/shift factor).
"""

import argparse
import json
import os

import numpy as np

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae import train as train_lib


def write_stats(vae_dir, images):
  """Computes statistics of `images` (float [N, H, W, 3]) and writes them beside the weights."""
  vae = vae_lib.load_vae(vae_dir)
  mean, std = train_lib.latent_statistics(vae, images)
  path = os.path.join(vae_dir, vae_lib.STATS_FILE)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"mean": mean.tolist(), "std": std.tolist(), "images": int(len(images))}, f)
  return path, mean, std


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vae", required=True, help="VAE directory (diffusers format)")
  parser.add_argument("--images", required=True, help="folder of images")
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--max_images", type=int, default=2048)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  files = images_lib.list_images(args.images)
  rng = np.random.default_rng(args.seed)
  files = [files[i] for i in sorted(rng.permutation(len(files))[:args.max_images])]
  images = np.stack([images_lib.load_image(f, args.resolution) for f in files])
  path, mean, std = write_stats(args.vae, images)
  print(f"latent statistics of {len(files)} images written to {path}")
  print("  mean " + " ".join(f"{m:+.3f}" for m in mean))
  print("  std  " + " ".join(f"{s:.3f}" for s in std))


if __name__ == "__main__":
  main()
