"""Training-loop speed on this machine: steps/s, and how long a checkpoint save blocks the loop.

Usage: python benchmarks/train_speed.py --config experiments/configs/tiny.py --seq_len 128
       python benchmarks/train_speed.py --config experiments/configs/paper.py:0.16B \
           --seq_len 256 --batch 1 --steps 3 --dtype float32

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

from tfusion import checkpoint, configlib, sharding, train, train_state
from tfusion.data import synthetic


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="experiments/configs/tiny.py")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default=None)
  args = parser.parse_args()
  config = configlib.load_config_file(args.config)
  config.data.seq_len, config.data.batch_size = args.seq_len, args.batch
  if args.dtype:
    config.model.dtype = args.dtype
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
  print(f"{args.config}: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq_len}, "
        f"{config.model.dtype}, {jax.devices()[0].device_kind} x{len(jax.devices())}")
  print(f"  first step (compile) {compile_s:.1f} s; {1 / step_s:.3f} steps/s "
        f"({step_s * 1000:.0f} ms/step, {args.batch * args.seq_len / step_s:,.0f} positions/s)")
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


if __name__ == "__main__":
  main()
