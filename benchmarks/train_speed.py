"""Training-loop speed on this machine: steps/s, tokens/s, MFU and HFU, and how long a
checkpoint save blocks the loop.

Usage: python benchmarks/train_speed.py --config experiments/configs/tiny.py --seq_len 128
       python benchmarks/train_speed.py --config experiments/configs/paper.py:0.16B \
           --seq_len 256 --batch 1 --steps 3 --dtype float32
       # the issue-15 target: 0.37B at L=4096 on one H100/H200 (goal MFU >= 50%)
       python benchmarks/train_speed.py --config experiments/configs/paper.py:0.37B \
           --seq_len 4096 --batch 4 --steps 10 --attention_impl auto --remat minimal --no_save

MFU counts model FLOPs (tfusion/flops.py: 6ND plus the attention pairs the mask allows);
HFU counts the attention pairs the kernel computes (attention.computed_pairs: whole visited
blocks, or L^2 for dense), so HFU - MFU is the work spent on masked elements. Both need a
device with a known peak (flops.PEAK_BF16_FLOPS). Synthetic rows (tfusion/data/synthetic.py)
pack documents of text and images.

Runs the real jitted, donating train step on synthetic data, then saves the state with an
async and with a synchronous CheckpointManager and reports the time each `save()` call keeps
the training loop waiting (async: the device->host copy only; sync: the whole write).
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from tfusion import checkpoint, configlib, flops, sharding, train, train_state
from tfusion.model import attention
from tfusion.data import synthetic


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="experiments/configs/tiny.py")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default=None)
  parser.add_argument("--attention_impl", default=None, help="config.model.attention_impl")
  parser.add_argument("--remat", default=None, help="config.model.remat")
  parser.add_argument("--no_save", action="store_true", help="skip the checkpoint timing")
  args = parser.parse_args()
  config = configlib.load_config_file(args.config)
  config.data.seq_len, config.data.batch_size = args.seq_len, args.batch
  if args.dtype:
    config.model.dtype = args.dtype
  if args.attention_impl:
    config.model.attention_impl = args.attention_impl
  if args.remat:
    config.model.remat = args.remat
  mesh = sharding.make_mesh(config.mesh)
  shardings = train_state.state_shardings(config, mesh)
  state = train_state.init_state(config, mesh, jax.random.PRNGKey(0))
  n_params = train_state.param_count(state)
  step_fn = train.make_train_step(config, mesh, shardings)
  data = synthetic.SyntheticIterator(config, row_start=0, row_count=args.batch)
  batches = [sharding.global_batch_from_local(mesh, next(data), args.batch)
             for _ in range(args.steps + 1)]
  t0 = time.perf_counter()
  state, out = step_fn(state, batches[0])
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for b in batches[1:]:
    state, out = step_fn(state, b)
  jax.block_until_ready(out)
  step_s = (time.perf_counter() - t0) / args.steps
  m = config.model
  impl = attention.resolve_implementation(m.attention_impl, head_dim=m.head_dim)
  print(f"{args.config}: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
        f"{m.dtype}, attention {impl}, remat {m.remat}, {jax.devices()[0].device_kind} "
        f"x{len(jax.devices())}")
  print(f"  first step (compile) {compile_s:.1f} s; {1 / step_s:.3f} steps/s "
        f"({step_s * 1000:.0f} ms/step, {args.batch * args.seq_len / step_s:,.0f} positions/s)")
  model_flops, hardware_flops = step_flops(config, n_params, batches[1:])
  peak = flops.peak_flops(jax.devices())
  line = (f"  FLOPs/step: model {model_flops:.3e}, hardware {hardware_flops:.3e} "
          f"({hardware_flops / model_flops:.2f}x)")
  if peak:
    line += (f"; MFU {model_flops / step_s / peak:.1%}, HFU {hardware_flops / step_s / peak:.1%}"
             f" of {peak / 1e12:.0f} TFLOP/s")
  print(line)
  if args.no_save:
    return
  config_json = config.to_json_best_effort()
  for async_save in (True, False):
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint.Checkpointer(tmp, async_save=async_save)
      t0 = time.perf_counter()
      ckpt.save(1, state, {"step": 1}, config_json, force=True)
      blocked = time.perf_counter() - t0
      ckpt.wait()
      total = time.perf_counter() - t0
      size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
      ckpt.close()
    kind = "async" if async_save else "sync "
    print(f"  {kind} save: loop blocked {blocked:.2f} s, save complete after {total:.2f} s "
          f"({size / 1e6:.0f} MB)")


def step_flops(config, n_params, batches):
  """Mean (model, hardware) FLOPs of one step over `batches` (tfusion/flops.py's formula with
  the allowed pairs, resp. the pairs the attention kernel computes)."""
  m = config.model
  model, hardware = [], []
  for b in batches:
    seg, idx = np.asarray(b["segment_ids"]), np.asarray(b["image_index"])
    kw = dict(intra_image=m.intra_image)
    allowed = float(np.asarray(attention.allowed_pairs(seg, idx, **kw)).sum())
    computed = float(attention.computed_pairs(
        seg, idx, implementation=m.attention_impl, block_q=m.attention_block,
        block_k=m.attention_block, head_dim=m.head_dim, **kw))
    model.append(flops.train_flops_per_step(config, n_params, allowed))
    hardware.append(flops.train_flops_per_step(config, n_params, computed))
  return float(np.mean(model)), float(np.mean(hardware))


if __name__ == "__main__":
  main()
