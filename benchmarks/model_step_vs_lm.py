"""One jitted train step (loss + grads + SGD update) of Transfusion vs the same trunk as a plain LM.

Both see B x L positions. The plain LM is the same parameters' embedding -> trunk -> LM head
with a causal mask and cross-entropy at every position; Transfusion adds the image encoder and
decoder, the diffusion noise, the packed-row mask and the per-image loss. Steps alternate between
the two so machine noise hits both alike; the ratio of medians is the figure.

Usage: python benchmarks/model_step_vs_lm.py [--encoder linear|unet] [--steps 10]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tfusion import configlib, diffusion, losses
from tfusion.model import attention, transfusion


def make_batch(rng, batch, length, slots, latent, patch, vocab):
  """Rows of [text 64 | BOI | image | EOI] repeated: `slots` images per row, rest text."""
  n = (latent // patch) ** 2
  tokens = rng.integers(3, vocab, (batch, length)).astype(np.int32)
  image_index = np.full((batch, length), -1, np.int32)
  for m in range(slots):
    start = m * (length // slots) + 64
    image_index[:, start:start + n] = m
  tokens[image_index >= 0] = 0
  nxt = np.pad(image_index[:, 1:], ((0, 0), (0, 1)), constant_values=0)
  return dict(
      tokens=tokens, targets=np.roll(tokens, -1, 1),
      text_loss_mask=(image_index < 0) & (nxt < 0),
      segment_ids=np.ones((batch, length), np.int32),
      positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
      image_index=image_index,
      images=rng.standard_normal((batch, slots, latent, latent, 4)).astype(np.float32),
      image_mask=np.ones((batch, slots), bool), image_max_t=np.ones((batch, slots), np.float32))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--encoder", default="linear")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--length", type=int, default=1024)
  args = parser.parse_args()

  config = configlib.base_config()
  m = config.model
  m.update(dict(d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64, mlp_dim=1536,
                vocab_size=32128))
  m.image.update(dict(latent_size=16, latent_channels=4, patch_size=2, encoder=args.encoder,
                      unet_channels=(64, 128)))
  model = transfusion.Transfusion(m)
  batch = make_batch(np.random.default_rng(0), args.batch, args.length, 4, 16, 2, m.vocab_size)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"], batch["positions"],
                               batch["segment_ids"], batch["image_index"], batch["images"],
                               jnp.zeros(batch["image_mask"].shape))
  tf_loss = losses.make_loss_fn(model, diffusion.from_config(config))

  def lm_loss(p, b, rng):
    del rng
    x = model.apply(p, b["tokens"], method=lambda mdl, t: mdl.embedding(t))
    causal = attention.attention_mask(b["segment_ids"], jnp.full_like(b["image_index"], -1))
    h, _ = model.apply(p, x, b["positions"], causal, method=transfusion.Transfusion.run_trunk)
    logits = model.apply(p, h, method=transfusion.Transfusion.text_logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"]).mean(), {}

  def make_step(loss_fn):
    @jax.jit
    def step(p, b, rng):
      (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, rng)
      return jax.tree.map(lambda a, d: a - 1e-4 * d, p, g), loss
    return step

  steps = {"transfusion": make_step(tf_loss), "plain_lm": make_step(lm_loss)}
  times = {k: [] for k in steps}
  for name, step in steps.items():  # compile + warm up
    jax.block_until_ready(step(params, batch, jax.random.PRNGKey(0)))
  for i in range(args.steps):
    for name, step in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, batch, jax.random.PRNGKey(i)))
      times[name].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  print(f"B={args.batch} L={args.length} d=512 layers=4 vocab=32128, 4 images x 64 patches per row,"
        f" encoder={args.encoder}, {jax.devices()[0].platform}")
  for k, v in med.items():
    print(f"  {k:12s} median step {v * 1000:8.1f} ms")
  print(f"  ratio transfusion / plain_lm = {med['transfusion'] / med['plain_lm']:.3f}")


if __name__ == "__main__":
  main()
