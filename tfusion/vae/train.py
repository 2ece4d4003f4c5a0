"""Trains a VAE from scratch: `tfusion-train-vae --images DIR --out VAE_DIR [...]`.

Loss: L1 reconstruction + kl_weight * KL(posterior || N(0, I)) per latent element, plus any
extra terms passed as `extra_losses` (e.g. a perceptual or adversarial term: functions
(params, images, reconstructions) -> scalar). Checkpoints (Orbax) go to `<out>/checkpoints`;
a rerun resumes. At the end the held-out PSNR is reported, per-channel latent statistics are
computed on the training images, and the VAE is saved in the loadable (diffusers) format.
"""

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae.model import AutoencoderKL, VAEConfig


def psnr(images, reconstructions):
  """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
  mse = float(np.mean((np.clip(reconstructions, -1, 1) - images) ** 2))
  return 10 * math.log10(4.0 / max(mse, 1e-12))


def latent_statistics(vae, images, batch_size=64):
  """Per-channel mean/std of the raw posterior means over `images` [N, H, W, 3]."""
  raw = vae_lib.VAE(vae.config, vae.params)  # no normalization
  lat = np.concatenate([np.asarray(raw.encode(images[i:i + batch_size]))
                        for i in range(0, len(images), batch_size)])
  flat = lat.reshape(-1, lat.shape[-1]).astype(np.float64)
  return flat.mean(0), flat.std(0)


def train_vae(images, config: VAEConfig, *, steps=2000, batch_size=32, lr=1e-3, kl_weight=1e-4,
              holdout=0.05, seed=0, workdir=None, extra_losses=(), log_every=100, log=print):
  """Trains on `images` (float [N, H, W, 3] in [-1, 1]). Returns (VAE with stats, report)."""
  images = np.asarray(images, np.float32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  n_held = max(1, int(len(images) * holdout))
  held, train = images[order[:n_held]], images[order[n_held:]]
  model = AutoencoderKL(config)
  params = vae_lib.init_vae(config, seed).params
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, min(100, steps // 10 + 1), steps,
                                                      lr / 10), weight_decay=0.0)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def loss_fn(p, x, key):
    recon, mean, logvar = model.apply({"params": p}, x, key)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    total = l1 + kl_weight * kl
    for extra in extra_losses:
      total = total + extra(p, x, recon)
    return total, {"l1": l1, "kl": kl}

  @jax.jit
  def step_fn(st, x, key):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st["params"], x, key)
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    return {"params": optax.apply_updates(st["params"], updates), "opt_state": opt_state,
            "step": st["step"] + 1}, dict(aux, loss=loss)

  manager = None
  start = 0
  if workdir:
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    if manager.latest_step() is not None:
      start = manager.latest_step()
      state = manager.restore(start, args=ocp.args.StandardRestore(state))
      log(f"vae: resumed at step {start}")
  history = []
  t0 = time.perf_counter()
  for step in range(start, steps):
    # Batches and noise depend on (seed, step) only, so a resumed run continues identically.
    batch_rng = np.random.default_rng([seed, step])
    x = train[batch_rng.integers(0, len(train), batch_size)]
    state, aux = step_fn(state, x, jax.random.fold_in(jax.random.PRNGKey(seed), step))
    if (step + 1) % log_every == 0 or step + 1 == steps:
      aux = {k: float(v) for k, v in aux.items()}
      history.append({"step": step + 1, **aux})
      log(f"vae step {step + 1}/{steps} loss {aux['loss']:.4f} l1 {aux['l1']:.4f} "
          f"kl {aux['kl']:.3f} ({time.perf_counter() - t0:.0f}s)")
    if manager is not None and ((step + 1) % 500 == 0 or step + 1 == steps):
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  vae = vae_lib.VAE(config, state["params"])
  recon = np.asarray(vae.decode(vae.encode(held)))
  mean, std = latent_statistics(vae, train[:2048])
  report = {"heldout_psnr": psnr(held, recon), "heldout_images": len(held), "steps": steps,
            "train_seconds": time.perf_counter() - t0, "history": history}
  return vae.with_stats(mean, std), report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", required=True, help="folder of training images")
  parser.add_argument("--out", required=True, help="output VAE directory (diffusers format)")
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--block_out_channels", default="64,128,256,256")
  parser.add_argument("--layers_per_block", type=int, default=1)
  parser.add_argument("--latent_channels", type=int, default=8)
  parser.add_argument("--norm_num_groups", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--kl_weight", type=float, default=1e-6)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  images, files = images_lib.load_folder(args.images, args.resolution)
  print(f"vae: {len(files)} images from {args.images} at {args.resolution}px")
  config = VAEConfig(block_out_channels=tuple(int(c) for c in args.block_out_channels.split(",")),
                     layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
                     norm_num_groups=args.norm_num_groups)
  vae, report = train_vae(images, config, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, kl_weight=args.kl_weight, seed=args.seed, workdir=args.out)
  vae_lib.save_vae(vae, args.out)
  print(f"vae: held-out PSNR {report['heldout_psnr']:.2f} dB on {report['heldout_images']} "
        f"images; saved to {args.out}")


if __name__ == "__main__":
  main()
