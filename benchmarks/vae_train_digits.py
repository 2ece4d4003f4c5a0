"""Trains the demo VAE on scikit-learn's digits (upscaled to 32x32 RGB) and reports held-out PSNR.

Usage: python benchmarks/vae_train_digits.py                         # the demo's VAE
       python benchmarks/vae_train_digits.py --steps 1500 --out /tmp/digits_vae
       python benchmarks/vae_train_digits.py --quantizer vq --num_codes 256   # the VQ-VAE

The 1797 8x8 digits (16 gray levels) are scaled to [0, 1], upscaled bicubically to 32x32 and
replicated to RGB by tfusion.vae.images (as the demo does); 10% are held out. The trainer is
`tfusion.vae.train.train_vae` (L1 + KL). Reports the held-out PSNR next to two references: the
best constant guess (the mean training image) and 4x average-pool + nearest upsample, a
compression with as many numbers per image (8x8x3 = 192) as an 8x8x4 latent (256) would need.
`--quantizer vq` trains the Chameleon baseline's VQ-VAE instead (tfusion.vae.train_vq: L1 +
commitment, EMA codebook) and also reports the held-out code usage. With --out the VAE is saved (diffusers format, loadable by load_vae) with a PNG of held-out
images (top) and their reconstructions (bottom).
"""

import argparse
import os
import resource
import time

import jax
import numpy as np

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae import train as train_lib
from tfusion.vae.model import VAEConfig


def digits_images(size):
  """sklearn digits -> float32 [1797, size, size, 3] in [-1, 1]."""
  from sklearn.datasets import load_digits
  digits = load_digits().images / 16.0
  return np.stack([images_lib.array_to_model_input(d, size, source=f"digits[{i}]")
                   for i, d in enumerate(digits)])


def pool_baseline(images, factor):
  """Average-pool by `factor`, then nearest-upsample back (a non-learned codec)."""
  n, h, w, c = images.shape
  pooled = images.reshape(n, h // factor, factor, w // factor, factor, c).mean((2, 4))
  return np.repeat(np.repeat(pooled, factor, 1), factor, 2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--block_out_channels", default="16,32,64")
  parser.add_argument("--layers_per_block", type=int, default=1)
  parser.add_argument("--latent_channels", type=int, default=4)
  parser.add_argument("--norm_num_groups", type=int, default=16)
  parser.add_argument("--attention", action="store_true",
                      help="mid-block attention (the demo VAE has none)")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--kl_weight", type=float, default=1e-4)
  parser.add_argument("--holdout", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quantizer", choices=("kl", "vq"), default="kl")
  parser.add_argument("--num_codes", type=int, default=256, help="vq: codebook size")
  parser.add_argument("--out", default=None, help="save the VAE and a reconstruction PNG here")
  args = parser.parse_args()
  config = VAEConfig(block_out_channels=tuple(int(c) for c in args.block_out_channels.split(",")),
                     layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
                     norm_num_groups=args.norm_num_groups,
                     mid_block_add_attention=args.attention)
  t0 = time.perf_counter()
  images = digits_images(args.size)
  f = config.downsample_factor
  print(f"digits: {len(images)} images {args.size}x{args.size}x3 -> latents "
        f"{args.size // f}x{args.size // f}x{config.latent_channels}; {config}; "
        f"{jax.devices()[0].device_kind} x{len(jax.devices())}")
  common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, holdout=args.holdout,
                seed=args.seed, log_every=max(1, args.steps // 10))
  if args.quantizer == "vq":
    from tfusion.vae import train_vq
    vae, report = train_vq.train_vq(images, config, num_codes=args.num_codes, **common)
    usage = report["heldout_usage"]
    print(f"codes {report['code_shape']} per image; held-out code perplexity "
          f"{usage['perplexity']:.1f}, {usage['used']:.0%} of {args.num_codes} codes used")
  else:
    vae, report = train_lib.train_vae(images, config, kl_weight=args.kl_weight, **common)
  total_s = time.perf_counter() - t0
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu_s = usage.ru_utime + usage.ru_stime
  # The trainer's split: the first n_held of the seeded permutation are held out.
  order = np.random.default_rng(args.seed).permutation(len(images))
  held = images[order[:report["heldout_images"]]]
  train = images[order[report["heldout_images"]:]]
  mean_psnr = train_lib.psnr(held, np.broadcast_to(train.mean(0), held.shape))
  pool_psnr = train_lib.psnr(held, pool_baseline(held, f))
  print(f"held-out PSNR {report['heldout_psnr']:.2f} dB on {report['heldout_images']} images "
        f"(mean-image guess {mean_psnr:.2f} dB, {f}x avg-pool+upsample {pool_psnr:.2f} dB)")
  print(f"{args.steps} steps x batch {args.batch_size} in {report['train_seconds']:.0f} s "
        f"(training incl. compile + final eval); {total_s:.0f} s with data preparation; "
        f"{cpu_s:.0f} CPU-s in all (process time: steadier than wall time on a shared machine)")
  if args.out and args.quantizer == "vq":
    from tfusion.vae import vq as vq_lib
    vq_lib.save_vq(vae, args.out)
    print(f"saved the VQ-VAE to {args.out}")
  elif args.out:
    vae_lib.save_vae(vae, args.out)
    recon = np.asarray(vae.decode(vae.encode(held[:16])))
    grid = np.concatenate([np.concatenate(list(held[:16]), 1), np.concatenate(list(recon), 1)], 0)
    from PIL import Image
    Image.fromarray(images_lib.to_uint8(grid)).save(os.path.join(args.out, "reconstructions.png"))
    print(f"saved the VAE and reconstructions.png to {args.out}")


if __name__ == "__main__":
  main()
