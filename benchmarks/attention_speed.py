"""Attention forward+backward speed per implementation, Transfusion layout vs causal-only.

Rows of length L hold documents of `--doc_len` positions; in the Transfusion layout each
document alternates text and images of `--patches` positions so that about half of the row is
image patches (bidirectional inside each image); the causal-only layout is the same rows as
plain causal text (same documents, no images). For each implementation: the median time of one
jitted forward+backward (grads w.r.t. q, k, v) and the model TFLOP/s, counting
12 * heads * head_dim FLOPs per *allowed* (query, key) pair (forward QK^T + PV = 4, backward
2x that): what the mask requires, not what a kernel computes.

`--model_memory L` instead prints XLA's compiled memory analysis (temp bytes) of a 1-layer
Transfusion forward+backward at length L, dense vs chunked.

Usage (GPU/TPU): python benchmarks/attention_speed.py --length 4096 8192
         (CPU):  python benchmarks/attention_speed.py --length 512 1024 --block 128 --heads 4
                 python benchmarks/attention_speed.py --model_memory 2048
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfusion import configlib
from tfusion.model import attention, transfusion


def make_layout(batch, length, doc_len, patches, text_run, with_images):
  """int32 [B, L] segment_ids, image_index: documents of doc_len; text / BOI / image / EOI runs."""
  seg = np.zeros((batch, length), np.int32)
  idx = np.full((batch, length), -1, np.int32)
  for r in range(batch):
    slot = 0
    for d, start in enumerate(range(0, length, doc_len)):
      end = min(start + doc_len, length)
      seg[r, start:end] = d + 1
      pos = start + text_run + r % 7  # rows differ a little
      while with_images and pos + patches + 1 <= end:
        idx[r, pos + 1:pos + 1 + patches] = slot  # BOI at pos, EOI after the image
        slot += 1
        pos += patches + 2 + text_run
  return seg, idx


def time_fn(fn, args, steps):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench(args):
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); B={args.batch} "
        f"H={args.heads} Hkv={args.kv_heads} D={args.head_dim} block={args.block} {args.dtype}")
  print(f"{'L':>6} {'layout':>11} {'impl':>10} {'pairs/L^2':>9} {'ms':>9} {'TFLOP/s':>8}")
  dtype = jnp.dtype(args.dtype)
  rng = np.random.default_rng(0)
  for length in args.length:
    shape = lambda h: (args.batch, length, h, args.head_dim)
    q = jnp.asarray(rng.standard_normal(shape(args.heads)), dtype)
    k = jnp.asarray(rng.standard_normal(shape(args.kv_heads)), dtype)
    v = jnp.asarray(rng.standard_normal(shape(args.kv_heads)), dtype)
    for name in ["transfusion", "causal"]:
      seg, idx = make_layout(args.batch, length, args.doc_len or length, args.patches,
                             args.text_run, name == "transfusion")
      iv = attention.intervals(seg, idx)
      pairs = int(np.asarray(attention.allowed_pairs(seg, idx)).sum())
      flops = 12 * args.heads * args.head_dim * pairs
      for impl in args.impls:
        try:
          attention.resolve_implementation(impl, head_dim=args.head_dim)
        except ValueError as e:
          print(f"{length:>6} {name:>11} {impl:>10} skipped: {e}")
          continue
        attn = functools.partial(attention.dot_product_attention, implementation=impl,
                                 block_q=args.block, block_k=args.block)
        loss = lambda q, k, v, iv: attn(q, k, v, iv).astype(jnp.float32).sum()
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
          sec = time_fn(step, (q, k, v, iv), args.steps)
        except Exception as e:  # pylint: disable=broad-except  (OOM of dense at long L)
          print(f"{length:>6} {name:>11} {impl:>10} failed: {str(e).splitlines()[0][:80]}")
          continue
        print(f"{length:>6} {name:>11} {impl:>10} {pairs / (args.batch * length ** 2):>9.3f} "
              f"{sec * 1e3:>9.2f} {flops / sec / 1e12:>8.3f}")


def model_memory(length):
  """Temp memory of a compiled 1-layer Transfusion forward+backward, dense vs chunked."""
  config = configlib.base_config()
  m = config.model
  m.num_layers, m.image.latent_size, m.image.patch_size = 1, 32, 2  # 256 patches per image
  b, slots = 1, 4
  seg, idx = make_layout(b, length, length, 256, 256, True)
  tokens = jnp.zeros((b, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  lat = jnp.zeros((b, slots, 32, 32, m.image.latent_channels))
  args = (tokens, pos, jnp.asarray(seg), jnp.asarray(np.minimum(idx, slots - 1)), lat,
          jnp.zeros((b, slots)))
  for impl in ["dense", "chunked"]:
    m.attention_impl = impl
    model = transfusion.Transfusion(m)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
    grad = jax.grad(lambda p: sum(x.sum() for x in model.apply(p, *args)))
    mem = jax.jit(grad).lower(params).compile().memory_analysis()
    print(f"L={length} {impl:>8}: temp {mem.temp_size_in_bytes / 2**20:8.1f} MiB, "
          f"args {mem.argument_size_in_bytes / 2**20:6.1f} MiB, "
          f"out {mem.output_size_in_bytes / 2**20:6.1f} MiB")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--length", type=int, nargs="+", default=[4096, 8192])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv_heads", type=int, default=None)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--doc_len", type=int, default=0, help="document length (0 = whole row)")
  p.add_argument("--patches", type=int, default=256)
  p.add_argument("--text_run", type=int, default=254, help="text between images (~half patches)")
  p.add_argument("--impls", nargs="+", default=["dense", "chunked", "auto"])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--model_memory", type=int, default=0)
  args = p.parse_args()
  args.kv_heads = args.kv_heads or args.heads
  if args.model_memory:
    model_memory(args.model_memory)
  else:
    bench(args)


if __name__ == "__main__":
  main()
