"""Trains a VAE from scratch: `tfusion-train-vae --images DIR --out VAE_DIR [...]`.

Loss: L1 reconstruction + kl_weight * KL(posterior || N(0, I)) per latent element, plus any
extra terms passed as `extra_losses` (e.g. a perceptual or adversarial term: functions
(params, images, reconstructions) -> scalar). Checkpoints (Orbax) go to `<out>/checkpoints`;
a rerun resumes. At the end the held-out PSNR is reported, per-channel latent statistics are
computed on the training images, and the VAE is saved in the loadable (diffusers) format.

`--quantizer vq` trains the Chameleon baseline's VQ-VAE instead (tfusion/vae/train_vq.py:
--num_codes, --code_dim, --commitment; saved as a diffusers-style VQModel directory).

Images that cannot be read are skipped, counted and named. The architecture is recorded in
`<out>/vae_train.json` at the start, so a rerun into an `--out` that holds a VAE of another
shape stops with one line saying what differs instead of failing inside the restore.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae.model import AutoencoderKL, VAEConfig


TRAIN_FILE = "vae_train.json"  # the architecture a workdir's checkpoints belong to


class ShapeMismatchError(ValueError):
  """The workdir holds a VAE (checkpoints or saved weights) of another architecture."""


def _describe(config_dict, keys):
  return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in config_dict.items()
                   if k in keys)


KL = {"kind": "kl"}  # the quantizer entry of a continuous VAE


def _stored_quantizer(raw):
  """The quantizer a vae_train.json or config.json describes (older files: a KL VAE)."""
  if "quantizer" in raw:
    return raw["quantizer"]
  if "num_vq_embeddings" in raw:
    return {"kind": "vq", "num_codes": raw["num_vq_embeddings"], "code_dim": raw["vq_embed_dim"]}
  return KL


def check_workdir(workdir, config: VAEConfig, quantizer=None):
  """Raises ShapeMismatchError when `workdir` holds a VAE of another architecture or
  quantizer (default: a KL VAE; a VQ-VAE passes {"kind": "vq", "num_codes", "code_dim"});
  else records this one (vae_train.json) so later reruns can be checked."""
  want = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as stored
  want["quantizer"] = quantizer or KL
  for name in (TRAIN_FILE, vae_lib.CONFIG_FILE):
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    stored = json.loads(json.dumps(dataclasses.asdict(VAEConfig.from_dict(raw))))
    stored["quantizer"] = _stored_quantizer(raw)
    diff = [k for k in want if stored[k] != want[k]]
    if diff:
      raise ShapeMismatchError(
          f"{workdir} holds a VAE with {_describe(stored, diff)}; this run asks for "
          f"{_describe(want, diff)}. Use another --out, or the same settings to resume")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, TRAIN_FILE)
  if not os.path.exists(path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(want, f, indent=2)
    os.replace(path + ".tmp", path)


def load_images(folder, resolution, log=print, show=3):
  """Readable images of `folder` -> (float32 [N, R, R, 3], files, unreadable files).

  An unreadable image is skipped, counted and named (the first `show`), not fatal.
  """
  images, kept, bad = [], [], []
  for path in images_lib.list_images(folder):
    try:
      images.append(images_lib.load_image(path, resolution))
      kept.append(path)
    except images_lib.BadImageError:
      bad.append(path)
  if bad:
    names = ", ".join(os.path.basename(b) for b in bad[:show]) + (", ..." if len(bad) > show
                                                                  else "")
    log(f"vae: skipped {len(bad)} unreadable image{'s' * (len(bad) > 1)}: {names}")
  if not images:
    raise ValueError(f"no readable images in {folder} ({len(bad)} unreadable)")
  return np.stack(images), kept, bad


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


def split_holdout(images, holdout, seed):
  """(held-out, train) images: a seeded shuffle, at least one held out."""
  images = np.asarray(images, np.float32)
  order = np.random.default_rng(seed).permutation(len(images))
  n_held = max(1, int(len(images) * holdout))
  return images[order[:n_held]], images[order[n_held:]]


def optimizer(lr, steps):
  """AdamW with a short warmup and a cosine decay to lr / 10 over `steps`."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  warmup = min(100, steps // 10 + 1, steps - 1)  # the cosine part needs >= 1 step
  return optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr / 10),
                     weight_decay=0.0)


def open_checkpoints(workdir, state, log):
  """(Orbax manager or None, start step, state): resumes from workdir/checkpoints when it has
  a checkpoint; one that does not restore into `state` is a ShapeMismatchError."""
  if not workdir:
    return None, 0, state
  ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start = manager.latest_step()
  if start is None:
    return manager, 0, state
  try:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
  except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for "does not fit"
    manager.close()
    raise ShapeMismatchError(f"{ckpt_dir}/{start} does not restore into this VAE (another "
                             f"architecture or a damaged checkpoint: {type(e).__name__}); "
                             "use another --out") from None
  log(f"vae: resumed at step {start}")
  return manager, start, state


def run_steps(state, step_fn, train, *, start, steps, batch_size, seed, manager, log_every,
              line, log):
  """The training loop of both autoencoder trainers, from `start` to `steps`.

  step_fn(state, images [batch_size, H, W, 3], key, step) -> (state, aux of scalars). Batches
  and keys depend on (seed, step) only, so a resumed run continues identically. The first step
  of a run is logged too (it shows compilation is done), then every `log_every` and the last:
  `line("step/steps", aux)` is the message. Checkpoints every 500 steps and at the end when `manager`.
  Returns (state, history [{"step", **aux}], seconds).
  """
  history = []
  t0 = time.perf_counter()
  for step in range(start, steps):
    batch_rng = np.random.default_rng([seed, step])
    x = train[batch_rng.integers(0, len(train), batch_size)]
    state, aux = step_fn(state, x, jax.random.fold_in(jax.random.PRNGKey(seed), step), step)
    if step == start or (step + 1) % max(log_every, 1) == 0 or step + 1 == steps:
      aux = {k: float(v) for k, v in aux.items()}
      history.append({"step": step + 1, **aux})
      log(f"{line(f'{step + 1}/{steps}', aux)} ({time.perf_counter() - t0:.0f}s)")
    if manager is not None and ((step + 1) % 500 == 0 or step + 1 == steps):
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return state, history, time.perf_counter() - t0


def train_vae(images, config: VAEConfig, *, steps=2000, batch_size=32, lr=1e-3, kl_weight=1e-4,
              holdout=0.05, seed=0, workdir=None, extra_losses=(), log_every=100, log=print):
  """Trains on `images` (float [N, H, W, 3] in [-1, 1]). Returns (VAE with stats, report)."""
  held, train = split_holdout(images, holdout, seed)
  model = AutoencoderKL(config)
  params = vae_lib.init_vae(config, seed).params
  tx = optimizer(lr, steps)
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

  if workdir:
    check_workdir(workdir, config)
  manager, start, state = open_checkpoints(workdir, state, log)
  state, history, seconds = run_steps(
      state, lambda st, x, key, step: step_fn(st, x, key), train, start=start, steps=steps,
      batch_size=batch_size, seed=seed, manager=manager, log_every=log_every, log=log,
      line=lambda at, a: f"vae step {at} loss {a['loss']:.4f} l1 {a['l1']:.4f} kl {a['kl']:.3f}")
  vae = vae_lib.VAE(config, state["params"])
  recon = np.asarray(vae.decode(vae.encode(held)))
  mean, std = latent_statistics(vae, train[:2048])
  report = {"heldout_psnr": psnr(held, recon), "heldout_images": len(held), "steps": steps,
            "train_seconds": seconds, "history": history}
  return vae.with_stats(mean, std), report


def _latent_note(resolution, block_out_channels, latent_channels):
  factor = 2 ** (len(block_out_channels.split(",")) - 1)
  side = resolution // factor
  return (f"{resolution}px images -> {side}x{side}x{latent_channels} latents "
          f"({factor}x downsampling: one per block_out_channels entry after the first)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--images", required=True, help="folder of training images")
  parser.add_argument("--out", required=True,
                      help="output VAE directory (diffusers format); a rerun resumes")
  parser.add_argument("--resolution", type=int, default=256, help="center-crop size, pixels")
  parser.add_argument("--block_out_channels", default="64,128,256,256",
                      help="channels per level; each level after the first halves the size")
  parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet blocks per level")
  parser.add_argument("--latent_channels", type=int, default=8, help="channels of a latent")
  parser.add_argument("--norm_num_groups", type=int, default=32, help="GroupNorm groups")
  parser.add_argument("--steps", type=int, default=20000, help="training steps")
  parser.add_argument("--batch_size", type=int, default=16, help="images per step")
  parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
  parser.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term")
  parser.add_argument("--quantizer", choices=("kl", "vq"), default="kl",
                      help="kl: continuous latents (Transfusion); vq: discrete codes (the "
                      "Chameleon baseline, tfusion/vae/train_vq.py)")
  parser.add_argument("--num_codes", type=int, default=1024, help="vq: codebook size")
  parser.add_argument("--code_dim", type=int, default=0,
                      help="vq: codebook vector size (0: --latent_channels)")
  parser.add_argument("--commitment", type=float, default=0.25, help="vq: commitment weight")
  parser.add_argument("--log_every", type=int, default=100,
                      help="steps between log lines (the first step is always logged)")
  parser.add_argument("--seed", type=int, default=0, help="init, batches and noise")
  parser.epilog = "With the defaults: " + _latent_note(*(parser.get_default(k) for k in (
      "resolution", "block_out_channels", "latent_channels"))) + "."
  args = parser.parse_args(argv)
  try:
    channels = tuple(int(c) for c in args.block_out_channels.split(","))
  except ValueError:
    parser.error(f"--block_out_channels {args.block_out_channels!r}: comma-separated integers")
  config = VAEConfig(block_out_channels=channels, layers_per_block=args.layers_per_block,
                     latent_channels=args.latent_channels, norm_num_groups=args.norm_num_groups)
  try:
    if args.resolution % config.downsample_factor:
      raise ValueError(f"--resolution {args.resolution} is not divisible by the "
                       f"{config.downsample_factor}x downsampling of --block_out_channels")
    vq = args.quantizer == "vq"
    if vq and args.num_codes < 2:
      raise ValueError(f"--num_codes {args.num_codes}: a codebook needs >= 2 codes")
    code_dim = args.code_dim or args.latent_channels
    quantizer = ({"kind": "vq", "num_codes": args.num_codes, "code_dim": code_dim} if vq
                 else None)
    check_workdir(args.out, config, quantizer)  # before loading images: a mistake shows at once
    images, files, _ = load_images(args.images, args.resolution)
    print(f"vae: {len(files)} images from {args.images}; "
          + _latent_note(args.resolution, args.block_out_channels, args.latent_channels))
    if vq:
      from tfusion.vae import train_vq
      vae, report = train_vq.train_vq(
          images, config, num_codes=args.num_codes, code_dim=code_dim, steps=args.steps,
          batch_size=args.batch_size, lr=args.lr, commitment=args.commitment, seed=args.seed,
          workdir=args.out, log_every=args.log_every)
    else:
      vae, report = train_vae(images, config, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, kl_weight=args.kl_weight, seed=args.seed,
                              workdir=args.out, log_every=args.log_every)
  except (ValueError, FileNotFoundError) as e:
    print(f"tfusion-train-vae: error: {e}", file=sys.stderr)
    sys.exit(2)
  if args.quantizer == "vq":
    from tfusion.vae import vq as vq_lib
    vq_lib.save_vq(vae, args.out)
    usage = report["heldout_usage"]
    print(f"vq: {report['code_shape'][0]}x{report['code_shape'][1]} codes per image; held-out "
          f"code perplexity {usage['perplexity']:.1f}, {usage['used']:.0%} of "
          f"{args.num_codes} codes used")
  else:
    vae_lib.save_vae(vae, args.out)
  print(f"vae: held-out PSNR {report['heldout_psnr']:.2f} dB on {report['heldout_images']} "
        f"images; saved to {args.out}")


if __name__ == "__main__":
  main()
