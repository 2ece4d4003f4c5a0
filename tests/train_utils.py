"""Shared helpers for training tests: a tiny config, running tfusion-train as a process."""

import os
import shutil
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
  return configlib.apply_overrides(config, overrides)


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


def tree_digest(path):
  """sha256 over every file's path and bytes under `path` (to show a directory unchanged)."""
  import hashlib
  digest = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      digest.update(full.encode())
      with open(full, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def grain_data(root):
  """A tokenizer and small text and image-caption ArrayRecord files under `root` (a Path).

  Returns config overrides for `tiny_config` that train on them through the Grain pipeline.
  """
  from tfusion.data import records, samples
  samples.sample_tokenizer(str(root), vocab_size=400)
  records.write_records(str(root / "text.array_record"), [
      records.text_record(t) for _, t in samples.pydoc_topics()[:20]])
  rng = np.random.default_rng(0)
  records.write_records(str(root / "pairs.array_record"), [
      records.image_caption_record(rng.standard_normal((4, 4, 4)).astype(np.float32),
                                   f"picture number {i}") for i in range(12)])
  return {"data.source": "grain", "data.tokenizer": str(root / "tokenizer.model"),
          "data.text": str(root / "text.array_record"),
          "data.image_caption": str(root / "pairs.array_record"), "model.vocab_size": 512,
          "data.prefetch": 0}


_SHARED = {}


def shared_tiny_run(tmp_path_factory, steps=6, every=2):
  """One tiny in-process run (8 devices, checkpoints every `every` steps) per pytest session,
  shared by test files that only read it or copy it (a run costs a compile)."""
  key = (steps, every)
  if key not in _SHARED:
    from tfusion import train
    workdir = str(tmp_path_factory.mktemp(f"shared_run_{steps}_{every}"))
    config = tiny_config(**{"train.steps": steps, "checkpoint.every_steps": every})
    assert train.train_and_evaluate(config, workdir)["step"] == steps
    _SHARED[key] = workdir
  return _SHARED[key]


_STEP_FNS = {}


def _step_key(config, mesh):
  """What the jitted train step depends on: all but the train/checkpoint/eval blocks."""
  import json
  blocks = {k: v for k, v in json.loads(config.to_json_best_effort()).items()
            if k not in ("train", "checkpoint", "eval")}
  return (json.dumps(blocks, sort_keys=True), tuple(mesh.shape.items()),
          tuple(d.id for d in mesh.devices.flat))


def compiled_steps_reused():
  """Context: in-process runs of one model/optimizer/data config reuse one compiled train
  step (compiling costs ~10 s a run on CPU and is not what run-safety tests test)."""
  import pytest
  from tfusion import train
  real = train.make_train_step

  def cached(config, mesh, shardings):
    key = _step_key(config, mesh)
    if key not in _STEP_FNS:
      _STEP_FNS[key] = real(config, mesh, shardings)
    return _STEP_FNS[key]

  patch = pytest.MonkeyPatch()
  patch.setattr(train, "make_train_step", cached)
  return _Undo(patch)


class _Undo:
  def __init__(self, patch):
    self.patch = patch

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.patch.undo()
    return False


def random_params(config, seed=0):
  """Random parameters of the model's shapes (much faster than compiling model.init).

  Norm scales near 1, everything else N(0, 0.1^2): attention stays far from one-hot, so a
  wrong mask or a misplaced key changes the outputs.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from tfusion import train_state
  model = train_state.build_model(config)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *train_state.dummy_inputs(config.model)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32) * 0.1
    return jnp.asarray(noise + 1.0 if "scale" in jax.tree_util.keystr(path) else noise)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def run_demo(workdir, *flags):
  """`tfusion-demo --workdir=W FLAGS` as a user runs it (one CPU device) -> CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
  exe = shutil.which("tfusion-demo")
  cmd = [exe] if exe else [sys.executable, "-m", "tfusion.demo.main"]
  return subprocess.run(cmd + [f"--workdir={workdir}", *flags], env=env, capture_output=True,
                        text=True, timeout=1200)
