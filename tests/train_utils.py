"""Shared helpers for training tests: a tiny config, running tfusion-train as a process."""

import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")


def tiny_config(**overrides):
  from tfusion import configlib  # after conftest set up JAX
  config = configlib.load_config_file(TINY)
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_kv_heads = 2
  config.model.head_dim = 16
  config.model.mlp_dim = 64
  config.model.vocab_size = 64
  config.model.image.latent_size = 4
  config.data.seq_len = 48
  config.data.batch_size = 8
  config.data.max_images = 2
  config.train.log_every = 1
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


TINY_FLAGS = [
    "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
    "--config.model.head_dim=16", "--config.model.mlp_dim=64", "--config.model.vocab_size=64",
    "--config.model.image.latent_size=4", "--config.data.seq_len=48",
    "--config.data.batch_size=8", "--config.data.max_images=2", "--config.train.log_every=1",
]


def train_command(workdir, *flags, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, "-m", "tfusion.train", f"--config={TINY}", f"--workdir={workdir}",
         *TINY_FLAGS, *flags]
  return cmd, env


def run_train(workdir, *flags, devices=1, check=True):
  cmd, env = train_command(workdir, *flags, devices=devices)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"tfusion-train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def start_train(workdir, *flags, devices=1):
  cmd, env = train_command(workdir, *flags, devices=devices)
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=300, what="condition", proc=None):
  """Polls `predicate`; fails early with its stderr if `proc` ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the process ended ({proc.returncode}) before {what}:\n"
                           f"{proc.stderr.read()[-3000:]}")
    time.sleep(0.02)
  raise AssertionError(f"timed out waiting for {what}")


def losses_by_step(workdir):
  """{step: loss} from train.jsonl, the last record of each step (a resumed run redoes steps)."""
  from tfusion import metrics
  records = metrics.read_jsonl(os.path.join(workdir, "metrics", "train.jsonl"))
  return {r["step"]: (r["loss"], r["text_loss"], r["image_loss"]) for r in records}


def final_params(workdir):
  import jax
  from tfusion import checkpoint
  params, _, step = checkpoint.restore_params(workdir)
  return step, [np.asarray(x) for x in jax.tree.leaves(params)]
