"""The training job: `tfusion-train --config C --workdir W [--config.key=value ...]`.

Builds the mesh, the train state (directly sharded), the data iterator (this process's rows
only), and runs a jitted, state-donating step. Resumes automatically from the newest complete
checkpoint in W/checkpoints, restoring the data iterator too, so a resumed run continues with
exactly the batches an uninterrupted run would have seen. SIGTERM (preemption) saves a
checkpoint at the current step and exits cleanly.

Workdir: checkpoints/, config.json (resolved config), metrics/train.jsonl, tb/ (TensorBoard).
"""

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tfusion import batch as batch_lib
from tfusion import checkpoint as checkpoint_lib
from tfusion import diffusion, flops, losses, metrics as metrics_lib, optim, sharding, train_state


class ConfigMismatchError(ValueError):
  """The workdir holds checkpoints of a model that differs from the config."""


def make_data_iterator(config, mesh):
  """The iterator over this process's rows of each global batch (see tfusion/data/)."""
  start, count = sharding.process_rows(mesh, config.data.batch_size)
  if config.data.source == "synthetic":
    from tfusion.data import synthetic
    return synthetic.SyntheticIterator(config, row_start=start, row_count=count)
  if config.data.source == "grain":
    from tfusion.data import pipeline
    expected = config.data.batch_size // jax.process_count()
    if count != expected or start != jax.process_index() * expected:
      raise ValueError("the grain pipeline feeds equal contiguous row blocks in process order; "
                       f"this process holds rows {start}..{start + count - 1} on the mesh")
    return pipeline.make_iterator(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  raise ValueError(f"config.data.source must be 'synthetic' or 'grain', got {config.data.source!r}")


def make_train_step(config, mesh, shardings):
  """Returns the jitted step (state, batch) -> (state, metrics); the state is donated."""
  model = train_state.build_model(config)
  loss_fn = losses.make_loss_fn(model, diffusion.from_config(config),
                                image_weight=config.loss.image_weight)
  tx, schedule = optim.make_optimizer(config.optim)
  base_rng = jax.random.PRNGKey(config.seed)

  def step_fn(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])  # noise depends on (seed, step) only
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    # A non-finite step changes nothing but the step counter (the data moves on).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + 1}
    out = dict(aux, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite)
    return new_state, out

  batch_shard = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shard),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return jitted(state, batch)

  return run


def check_compatible(stored, config):
  """Raises ConfigMismatchError listing model keys that differ from a stored config."""
  current = json.loads(config.to_json_best_effort())
  diffs = []

  def walk(a, b, prefix):
    for key in sorted(set(a) | set(b)):
      x, y = a.get(key, "<missing>"), b.get(key, "<missing>")
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f"{prefix}{key}.")
      elif x != y and not (isinstance(x, list) and isinstance(y, (list, tuple)) and list(y) == x):
        diffs.append(f"config.{prefix}{key}: checkpoint has {x!r}, config has {y!r}")

  walk(stored.get("model", {}), current.get("model", {}), "model.")
  if diffs:
    raise ConfigMismatchError("the workdir holds checkpoints of a different model; start a new "
                              "workdir or match the config:\n  " + "\n  ".join(diffs))


@dataclasses.dataclass
class _Preemption:
  requested: bool = False

  def install(self):
    if threading_is_main():
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
    self.requested = True


def threading_is_main():
  import threading
  return threading.current_thread() is threading.main_thread()


def _fmt_duration(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def train_and_evaluate(config, workdir, *, on_log: Optional[Callable] = None):
  """Trains `config` in `workdir` (resuming from it). Returns a summary dict.

  on_log(step, scalars) is called at every log step (e.g. by the demo for progress).
  """
  mesh = sharding.make_mesh(config.mesh)  # impossible meshes fail here, before any writes
  num_patches = (config.model.image.latent_size // config.model.image.patch_size) ** 2
  shardings = train_state.state_shardings(config, mesh)
  ckpt_dir = checkpoint_lib.checkpoint_dir(workdir)
  if jax.process_count() > 1:  # every process looks at the workdir before any writes to it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tfusion:inspect-workdir")
  has_checkpoints = os.path.isdir(ckpt_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tfusion:inspected-workdir")
  if has_checkpoints:
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    steps = reader.all_steps()
    if steps:
      check_compatible(reader.restore_config(steps[-1]), config)
  data_iter = make_data_iterator(config, mesh)  # missing data fails here, before any writes

  os.makedirs(workdir, exist_ok=True)
  config_json = config.to_json_best_effort(indent=2)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config_json)
  ckpt = checkpoint_lib.Checkpointer(
      workdir, keep=config.checkpoint.keep, keep_period=config.checkpoint.keep_period or None,
      async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(train_state.abstract_state(config, mesh))
  if restored is None:
    state = train_state.init_state(config, mesh, jax.random.PRNGKey(config.seed))
    start = 0
  else:
    start, state, data_state = restored
    data_iter.set_state(data_state)
    logging.info("resumed from %s/%d", ckpt.directory, start)
  writer = metrics_lib.MetricWriter(os.path.join(workdir, "metrics", "train.jsonl"),
                                    os.path.join(workdir, "tb"))
  step_fn = make_train_step(config, mesh, shardings)
  flops_per_step = flops.train_flops_per_step(config, train_state.param_count(state))
  peak = flops.peak_flops(jax.devices())
  preemption = _Preemption()
  preemption.install()

  total = config.train.steps
  log_every = max(config.train.log_every, 1)
  nonfinite_run, skipped, pending = 0, 0, None
  window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
  loop_start, step, last = time.perf_counter(), start, {}
  stop_reason = "done"
  _print(f"training {config.model.num_layers}x{config.model.d_model} "
         f"({train_state.param_count(state) / 1e6:.2f}M params) on {mesh.devices.size} devices "
         f"mesh {dict(mesh.shape)}, steps {start}->{total}, workdir {workdir}")
  try:
    for step in range(start, total):
      preempted = preemption.requested or (
          jax.process_count() > 1 and ckpt.manager.reached_preemption(step))
      if preempted:
        stop_reason = "preempted"
        break
      local = next(data_iter)
      if config.train.validate_batches:
        try:
          batch_lib.check_batch_values(local, num_patches=num_patches)
        except batch_lib.BatchContractError as e:
          raise batch_lib.BatchContractError(f"batch of step {step}: {e}") from None
      window_tokens += int((local["segment_ids"] > 0).sum()) * jax.process_count()
      batch = sharding.global_batch_from_local(mesh, local, config.data.batch_size)
      state, out = step_fn(state, batch)
      window_steps += 1
      # Check the previous step's finiteness now: the device runs ahead by one step.
      if pending is not None:
        nonfinite_run, skipped = _count_nonfinite(pending, nonfinite_run, skipped, step - 1, config)
      pending = out
      if (step + 1) % log_every == 0 or step + 1 == total:
        nonfinite_run, skipped = _count_nonfinite(pending, nonfinite_run, skipped, step, config)
        pending = None
        last = {k: float(v) for k, v in jax.device_get(out).items() if k != "finite"}
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / window_steps
        tokens_per_s = window_tokens / elapsed
        scalars = dict(last, step_time=step_time, tokens_per_s=tokens_per_s,
                       skipped_steps=skipped)
        if peak:
          scalars["mfu"] = flops_per_step / step_time / peak
        writer.write(step + 1, scalars)
        eta = (total - step - 1) * step_time
        mfu = f" mfu {scalars['mfu'] * 100:.1f}%" if peak else ""
        _print(f"step {step + 1}/{total} loss {last['loss']:.4f} text {last['text_loss']:.4f} "
               f"image {last['image_loss']:.4f} grad_norm {last['grad_norm']:.3f} lr {last['lr']:.2e} "
               f"{tokens_per_s:,.0f} tok/s {step_time * 1000:.0f} ms/step{mfu} "
               f"eta {_fmt_duration(eta)}")
        if on_log is not None:
          on_log(step + 1, scalars)
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
      if (step + 1) % config.checkpoint.every_steps == 0 and step + 1 < total:
        ckpt.save(step + 1, state, data_iter.get_state(), config_json)
    else:
      step = total
    if pending is not None:
      nonfinite_run, skipped = _count_nonfinite(pending, nonfinite_run, skipped, step - 1, config)
  except BaseException:
    ckpt.close()  # let started saves finish: they hold good states
    writer.close()
    _close(data_iter)
    raise
  final_step = int(jax.device_get(state["step"]))
  if final_step not in ckpt.all_steps():
    ckpt.save(final_step, state, data_iter.get_state(), config_json, force=True)
  ckpt.close()
  writer.close()
  _close(data_iter)
  _print(f"{stop_reason} at step {final_step} ({_fmt_duration(time.perf_counter() - loop_start)}); "
         f"checkpoint {ckpt.directory}/{final_step}")
  return {"step": final_step, "stop_reason": stop_reason, "skipped_steps": skipped,
          "last": last, "state": state}


def _close(data_iter):
  """Stops the iterator's worker processes and prefetch threads, if it has any."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def _count_nonfinite(out, run, skipped, step, config):
  if bool(jax.device_get(out["finite"])):
    return 0, skipped
  run += 1
  skipped += 1
  logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step + 1,
                  run)
  if run >= config.train.max_nonfinite_steps:
    raise FloatingPointError(
        f"{run} steps in a row had a non-finite loss or gradient (last: step {step + 1}); "
        "stopping (config.train.max_nonfinite_steps). The last checkpoint is intact.")
  return run, skipped


def _print(message):
  if jax.process_index() == 0:
    print(message, flush=True)


# ----------------------------------------------------------------------------------- CLI


def _maybe_initialize_distributed(flags_values):
  """jax.distributed.initialize from flags, or from the environment on SLURM / TPU pods."""
  if flags_values.coordinator_address:
    jax.distributed.initialize(coordinator_address=flags_values.coordinator_address,
                               num_processes=flags_values.num_processes,
                               process_id=flags_values.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "," in os.environ.get(
      "TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)


def main():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
  flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's id (with coordinator_address)")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax is chatty; our warnings use stdlib logging
    _maybe_initialize_distributed(flags.FLAGS)
    try:
      train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ConfigMismatchError, ValueError, FileNotFoundError, FloatingPointError) as e:
      print(f"tfusion-train: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(run)


if __name__ == "__main__":
  main()
