"""Trains the Chameleon baseline's VQ-VAE: `tfusion-train-vae --quantizer vq ...`.

Loss: L1 reconstruction + commitment * ||z - sg(z_q)||^2 (beta 0.25, the paper's). The codebook
follows an EMA of the encoder vectors assigned to each code (tfusion/vae/quantizer.py), seeded
by k-means on the untrained encoder's outputs; codes used less than `dead_fraction` of the
average are restarted on vectors of the current batch every `restart_every` steps. Checkpoints,
resume and the architecture check are the KL trainer's (tfusion/vae/train.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfusion import vae as vae_lib
from tfusion.vae import quantizer, train as train_lib, vq as vq_lib


def train_vq(images, config, *, num_codes=1024, code_dim=None, steps=2000, batch_size=32,
             lr=1e-3, commitment=0.25, ema_decay=0.99, restart_every=100, dead_fraction=0.03,
             holdout=0.05, seed=0, workdir=None, log_every=100, log=print):
  """Trains on `images` (float [N, H, W, 3] in [-1, 1]).

  Returns (VQVAE, report) with report's held-out PSNR, code usage on the held-out images
  (perplexity, used fraction, dead codes) and the loss history.
  """
  code_dim = code_dim or config.latent_channels
  held, train = train_lib.split_holdout(images, holdout, seed)
  model = vq_lib.VQAutoencoder(config, code_dim)
  params = vae_lib.host_init(vq_lib.abstract_params(config, code_dim), seed)
  tx = train_lib.optimizer(lr, steps)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vq_lib.VQAutoencoder.encode))
  seed_vectors = encode(params, train[:256])
  codebook = quantizer.kmeans_init(seed_vectors, num_codes, jax.random.PRNGKey(seed))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "codebook": quantizer.init_ema_state(codebook)}

  def loss_fn(p, codebook, x):
    z = model.apply({"params": p}, x, method=vq_lib.VQAutoencoder.encode)
    q = quantizer.quantize(z, codebook)
    recon = model.apply({"params": p}, q.z_q, method=vq_lib.VQAutoencoder.decode)
    l1 = jnp.mean(jnp.abs(recon - x))
    return l1 + commitment * q.commitment, (z, q.codes, {"l1": l1, "commitment": q.commitment})

  @jax.jit
  def step_fn(st, x, key, restart):
    (loss, (z, codes, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        st["params"], st["codebook"]["codebook"], x)
    updates, opt_state = tx.update(grads, st["opt_state"], st["params"])
    book = quantizer.ema_update(st["codebook"], z, codes, ema_decay)
    threshold = dead_fraction * codes.size / num_codes  # of the average use per step
    book, restarted = jax.lax.cond(
        restart, lambda b: quantizer.restart_dead_codes(b, z, key, threshold),
        lambda b: (b, jnp.zeros((), jnp.int32)), book)
    counts = jnp.bincount(codes.reshape(-1), length=num_codes) / codes.size
    perplexity = jnp.exp(-jnp.sum(jnp.where(counts > 0, counts * jnp.log(counts), 0.0)))
    return ({"params": optax.apply_updates(st["params"], updates), "opt_state": opt_state,
             "step": st["step"] + 1, "codebook": book},
            dict(aux, loss=loss, perplexity=perplexity, restarted=restarted))

  if workdir:
    train_lib.check_workdir(workdir, config, {"kind": "vq", "num_codes": num_codes,
                                              "code_dim": code_dim})
  manager, start, state = train_lib.open_checkpoints(workdir, state, log)

  def one_step(st, x, key, step):
    restart = (step + 1) % max(restart_every, 1) == 0 and step + 1 < steps
    return step_fn(st, x, key, restart)

  state, history, seconds = train_lib.run_steps(
      state, one_step, train, start=start, steps=steps, batch_size=batch_size, seed=seed,
      manager=manager, log_every=log_every, log=log,
      line=lambda at, a: (f"vq step {at} loss {a['loss']:.4f} l1 {a['l1']:.4f} commitment "
                      f"{a['commitment']:.4f} code perplexity {a['perplexity']:.1f}"))
  vq = vq_lib.VQVAE(config, state["params"], state["codebook"]["codebook"])
  codes = np.asarray(vq.encode_codes(held))
  recon = np.asarray(vq.decode_codes(codes))
  report = {"heldout_psnr": train_lib.psnr(held, recon), "heldout_images": len(held),
            "steps": steps, "train_seconds": seconds, "history": history,
            "code_shape": list(codes.shape[1:]),
            "heldout_usage": quantizer.usage_stats(codes, num_codes)}
  return vq, report

