"""VAE encode (and decode) throughput on this machine: images/s for the demo and paper-size VAEs.

Usage: python benchmarks/vae_encode_throughput.py                 # both sizes
       python benchmarks/vae_encode_throughput.py --sizes demo --batch 64 --repeats 5

demo:  32x32 RGB -> 8x8x4 (4x down: the factor is 2 ** (len(block_out_channels) - 1), as in
       diffusers), block_out_channels (16, 32, 64), 1 resnet per block, 16 norm groups, no mid
       attention: the demo's VAE (tfusion/demo/main.py; benchmarks/vae_train_digits.py trains it).
paper: 256x256 RGB -> 32x32x8 (8x down, PAPER.md), SD-VAE widths (128, 256, 512, 512),
       2 resnets per block (the Stable Diffusion VAE architecture with 8 latent channels).
CPU-s/image (process CPU time) is printed too: on a shared machine it is steadier than wall time.
Random weights: throughput does not depend on their values. Times `VAE.encode` (the jitted
posterior mean plus normalization, what the latent precompute job calls) after one compile call.
"""

import argparse
import resource
import time

import jax
import numpy as np

from tfusion import vae as vae_lib
from tfusion.vae.model import VAEConfig

SIZES = {
    "demo": (VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                       norm_num_groups=16, mid_block_add_attention=False), 32, 64),
    "paper": (VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=8, norm_num_groups=32), 256, 4),
}


def _param_count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _time(fn, arg, repeats):
  """-> (first call s, wall s per call, process CPU s per call, output)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(arg))
  compile_s = time.perf_counter() - t0
  t0, c0 = time.perf_counter(), _cpu_seconds()
  for _ in range(repeats):
    out = fn(arg)
  jax.block_until_ready(out)
  return (compile_s, (time.perf_counter() - t0) / repeats, (_cpu_seconds() - c0) / repeats, out)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes", default="demo,paper")
  parser.add_argument("--batch", type=int, default=None, help="default: 64 demo, 4 paper")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--decode", action="store_true", help="time decode too")
  args = parser.parse_args()
  print(f"devices: {jax.devices()[0].device_kind} x{len(jax.devices())} "
        f"({jax.default_backend()})")
  for name in args.sizes.split(","):
    config, size, batch = SIZES[name]
    batch = args.batch or batch
    vae = vae_lib.init_vae(config)
    images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    compile_s, step_s, cpu_s, latents = _time(vae.encode, images, args.repeats)
    f = config.downsample_factor
    print(f"{name}: {_param_count(vae.params) / 1e6:.1f}M params, {size}x{size}x3 -> "
          f"{size // f}x{size // f}x{config.latent_channels}, batch {batch}")
    print(f"  encode: {batch / step_s:.3g} images/s ({step_s * 1000:.0f} ms/batch, "
          f"{cpu_s / batch:.3g} CPU-s/image; first call incl. compile {compile_s:.1f} s)")
    if args.decode:
      compile_s, step_s, cpu_s, _ = _time(vae.decode, latents, args.repeats)
      print(f"  decode: {batch / step_s:.3g} images/s ({step_s * 1000:.0f} ms/batch, "
            f"{cpu_s / batch:.3g} CPU-s/image; first call incl. compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
