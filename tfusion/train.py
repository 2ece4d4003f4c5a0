"""The training job: `tfusion-train --config C --workdir W [--config.key=value ...]`.

Builds the mesh, the train state (directly sharded), the data iterator (this process's rows
only), and runs a jitted, state-donating step. Resumes automatically from the newest complete
checkpoint in W/checkpoints, restoring the data iterator too, so a resumed run continues with
exactly the batches an uninterrupted run would have seen; metric records after the restored
step are dropped (they are redone). A checkpoint of another optimizer setting is refused,
naming what differs (config.train.restore=params_only keeps its params); only damaged ones are
set aside (tfusion/checkpoint.py). SIGTERM (preemption) and Ctrl-C save a checkpoint at the
current step and exit cleanly (exit status config.train.preempted_exit_code after SIGTERM); a
second Ctrl-C aborts at once. On several hosts a signal that reaches any one of them stops all
of them after the same step (_StopVote), and they save that step together.
`--init_from W1[:STEP]` forks another run (tfusion/fork.py).

Several processes: `distributed_setup` decides from the flags and the environment (SLURM,
GKE / multislice TPU variables, any Cloud TPU VM) whether and how to call
jax.distributed.initialize(); each process keeps its own data iterator state in the
checkpoints.

Before its first write the job takes W/LOCK (tfusion/workdir_lock.py): a second trainer on a
live workdir refuses. Workdir: checkpoints/, config.json (resolved config, a fork's lineage),
metrics/train.jsonl, tb/ (TensorBoard), logs/ (this job's warnings and info lines). The
workdir may be a URL (gs://bucket/run): every file goes through tfusion/paths.py, the
checkpoints through Orbax (see README, "Workdirs on GCS").
"""

import contextlib
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
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import batch as batch_lib
from tfusion import checkpoint as checkpoint_lib
from tfusion import diffusion, flops, logs, losses, metrics as metrics_lib, optim, sharding, train_state
from tfusion import configlib, discrete, ema, paths, workdir_lock
from tfusion.model import attention


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
    # Hosts that hold the same batch blocks (a tensor axis across hosts) read the same shard.
    shard, num_shards = sharding.data_shard(mesh)
    expected = config.data.batch_size // num_shards
    if count != expected or start != shard * expected:
      raise ValueError("the grain pipeline feeds equal contiguous row blocks in shard order; "
                       f"this process holds rows {start}..{start + count - 1} on the mesh")
    return pipeline.make_iterator(config, process_index=shard, process_count=num_shards)
  raise ValueError(f"config.data.source must be 'synthetic' or 'grain', got {config.data.source!r}")


def make_train_step(config, mesh, shardings):
  """Returns the jitted step (state, batch) -> (state, metrics); the state is donated."""
  model = train_state.build_model(config)
  loss_fn = losses.make_loss_fn(model, diffusion.from_config(config),
                                image_weight=config.loss.image_weight,
                                ce_chunk_size=config.loss.ce_chunk_size,
                                z_loss=config.loss.get("z_loss", 0.0))
  is_discrete = discrete.is_discrete(config.model)
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
    if ema.KEY in state:
      averaged = ema.update(state[ema.KEY], params, config.train.ema_decay, state["step"])
      new_state[ema.KEY] = keep(averaged, state[ema.KEY])
    # Attention pairs the mask allows: model FLOPs for the MFU (skipped blocks never count).
    # Discrete images are tokens: causal everywhere (the model ignores image_index).
    image_index = (jnp.full_like(batch["image_index"], -1) if is_discrete
                   else batch["image_index"])
    attn_pairs = attention.allowed_pairs(batch["segment_ids"], image_index,
                                         intra_image=config.model.intra_image)
    # Pairs the kernel computes (whole visited blocks, or L^2 dense): hardware FLOPs, the HFU.
    m = config.model
    computed = attention.computed_pairs(
        batch["segment_ids"], image_index, intra_image=m.intra_image,
        implementation=m.attention_impl, block_q=m.attention_block, block_k=m.attention_block,
        head_dim=m.head_dim)
    out = dict(aux, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite,
               attn_pairs=attn_pairs.astype(jnp.float32).sum(),  # float: > 2^31 on pods
               attn_pairs_computed=computed)
    return new_state, out

  batch_shard = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shard),
                     out_shardings=(shardings, None), donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      return jitted(state, batch)

  run.jitted = jitted  # for ahead-of-time compiles (tfusion-aot)
  return run


# How the model is computed, not what it is: a resumed run may change these (e.g. a remat
# policy to fit a new mesh) without touching the checkpoint.
EXECUTION_KEYS = ("model.remat", "model.attention_impl", "model.attention_block")


def check_compatible(stored, config):
  """Raises ConfigMismatchError listing model keys that differ from a stored config.

  A key the checkpoint's config lacks (added by a later tfusion) is fine at its default value.
  """
  current = json.loads(config.to_json_best_effort())
  defaults = json.loads(configlib.base_config().to_json_best_effort())["model"]
  diffs = []

  def walk(a, b, prefix, default):
    for key in sorted(set(a) | set(b)):
      if f"{prefix}{key}" in EXECUTION_KEYS:
        continue
      x, y = a.get(key, "<missing>"), b.get(key, "<missing>")
      d = default.get(key, "<missing>") if isinstance(default, dict) else "<missing>"
      if x == "<missing>" and y == d:
        continue
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f"{prefix}{key}.", d)
      elif x != y and not (isinstance(x, list) and isinstance(y, (list, tuple)) and list(y) == x):
        diffs.append(f"config.{prefix}{key}: checkpoint has {x!r}, config has {y!r}")

  walk(stored.get("model", {}), current.get("model", {}), "model.", defaults)
  if diffs:
    raise ConfigMismatchError("the workdir holds checkpoints of a different model; start a new "
                              "workdir or match the config:\n  " + "\n  ".join(diffs))


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save a checkpoint and stop.

  A second Ctrl-C aborts at once (KeyboardInterrupt). The previous handlers come back on
  `restore` (train_and_evaluate also runs inside other programs: the demo, tests).
  """

  def __init__(self):
    self.reason = None  # "preempted" (SIGTERM) | "interrupted" (Ctrl-C)
    self._previous = {}

  def install(self):
    if threading_is_main():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.reason == "interrupted":
        raise KeyboardInterrupt
      logging.warning("Ctrl-C: saving a checkpoint at the current step, then exiting "
                      "(Ctrl-C again aborts at once)")
      self.reason = "interrupted"
    else:
      logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting")
      self.reason = self.reason or "preempted"


class _StopVote:
  """Multi-host stops: every host learns, one step late, whether any host was asked to stop.

  A SIGTERM or Ctrl-C reaches one host; if it stopped alone, the others would wait forever in
  the next step's collectives. After dispatching each step, each host's request (0 none,
  1 Ctrl-C, 2 SIGTERM) goes through a tiny max over all devices, and the previous step's
  result is read where the loop already waits for that step (its finiteness check), so the
  device never idles for it. Every host reads the same values at the same steps, so all stop
  after the same step (and save that step together).
  """

  CODES = {None: 0, "interrupted": 1, "preempted": 2}

  def __init__(self, mesh):
    self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    self._shape = (mesh.devices.size,)
    self._local = len(mesh.local_devices)
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def vote(self, reason):
    """Starts the max over hosts of `reason` (async); read it with `agreed`."""
    local = np.full((self._local,), self.CODES[reason], np.int32)
    return self._max(jax.make_array_from_process_local_data(self._sharding, local, self._shape))

  @classmethod
  def agreed(cls, voted):
    """The reason every host stops for (None: go on); waits for the vote's step."""
    return {code: reason for reason, code in cls.CODES.items()}[int(jax.device_get(voted))]


def threading_is_main():
  import threading
  return threading.current_thread() is threading.main_thread()


def _fmt_duration(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def _newest_stored_config(reader, steps):
  """The stored config of the newest checkpoint whose config reads (damage is found later)."""
  for step in reversed(steps):
    try:
      return reader.restore_config(step)
    except Exception:  # noqa: BLE001 - a damaged checkpoint; restore_latest sets it aside
      continue
  return None


def train_and_evaluate(config, workdir, *, on_log: Optional[Callable] = None,
                       init_from: Optional[str] = None, init_what: str = "params",
                       force_unlock: bool = False):
  """Trains `config` in `workdir` (resuming from it). Returns a summary dict.

  on_log(step, scalars) is called at every log step (e.g. by the demo for progress).
  init_from="W1[:STEP]" starts a new run from another run's checkpoint (tfusion/fork.py),
  unless `workdir` has checkpoints of its own. The workdir is locked for the run
  (tfusion/workdir_lock.py); force_unlock takes over a lock left by a run that is gone.
  """
  mesh = sharding.make_mesh(config.mesh)  # impossible meshes fail here, before any writes
  shardings = train_state.state_shardings(config, mesh)
  ckpt_dir = checkpoint_lib.checkpoint_dir(workdir)
  if jax.process_count() > 1:  # every process looks at the workdir before any writes to it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tfusion:inspect-workdir")
  has_checkpoints = paths.isdir(ckpt_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tfusion:inspected-workdir")
  steps, lineage, parent = [], None, None
  if init_from:
    from tfusion import fork
    fork.check_not_self(init_from, workdir)
  if has_checkpoints:
    reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
    steps = reader.all_steps()
    stored = _newest_stored_config(reader, steps)
    if stored is not None:
      check_compatible(stored, config)
      lineage = stored.get("lineage")
    with _explain_structure(reader, config):  # another optimizer state: refuse before writing
      reader.check_newest(train_state.abstract_state(config, mesh), mode=config.train.restore)
  if init_from and steps:
    logging.warning("%s has checkpoints of its own (newest: step %d): resuming from them; "
                    "--init_from %s is ignored", workdir, steps[-1], init_from)
  elif init_from:
    parent = fork.Parent(init_from, init_what, workdir)  # read-only
  lock = workdir_lock.WorkdirLock(workdir, force=force_unlock)
  data_iter = None
  try:
    if parent is not None:
      check_compatible(parent.config, config)
      parent.check(train_state.abstract_state(config, mesh))
      lineage = parent.lineage(config)
    data_iter = make_data_iterator(config, mesh)  # missing data fails here, before any writes
    lock.acquire()  # a live run refuses here: the lock is this run's first write
  except BaseException:
    if data_iter is not None:
      _close(data_iter)
    if parent is not None:
      parent.close()
    raise
  log_file = None
  try:
    log_file = logs.log_to_file(workdir, "train")
    return _train(config, workdir, mesh, shardings, data_iter, parent, lineage, on_log)
  finally:
    if parent is not None:
      parent.close()
    if log_file is not None:
      logs.remove(log_file)
    lock.release()


@contextlib.contextmanager
def _explain_structure(ckpt, config):
  """Adds the optim/model config keys that differ from the checkpoint's to its structure error."""
  try:
    yield
  except checkpoint_lib.CheckpointStructureError as e:
    from tfusion import fork
    differ = fork.config_diff(ckpt.restore_config(e.step),
                              json.loads(config.to_json_best_effort()), ("checkpoint", "config"))
    raise checkpoint_lib.CheckpointStructureError(
        e.directory, e.step, e.diffs,
        hint=[d for d in differ if d.startswith(("optim.", "model."))]) from None


def _restore_or_init(config, ckpt, mesh, shardings, data_iter, parent):
  """-> (start step, state): this workdir's newest checkpoint, the parent's, or a fresh init."""
  abstract = train_state.abstract_state(config, mesh)
  with _explain_structure(ckpt, config):
    restored = ckpt.restore_latest(abstract, mode=config.train.restore)
  if restored is not None:
    start, state, data_state = restored
    state = _match_ema(config, state, shardings, f"checkpoint {ckpt.directory}/{start}",
                       checkpoint_lib.EMA_KEY in ckpt.state_metadata(start))
    if "opt_state" not in state:
      logging.warning("checkpoint %s/%d: its optimizer state does not fit this config; "
                      "config.train.restore=params_only: restored params, step and data "
                      "position, with a fresh optimizer state", ckpt.directory, start)
      from tfusion import fork
      state = dict(state, **fork.with_fresh_optimizer(config, shardings, state["params"], start))
    data_iter.set_state(data_state)
    logging.info("resumed from %s/%d", ckpt.directory, start)
    return start, state
  if parent is not None:
    state, data_state, start = parent.init_state(config, abstract, shardings)
    state = _match_ema(config, state, shardings, f"--init_from {parent.workdir}",
                       parent.has_ema)
    if data_state is not None:
      data_iter.set_state(data_state)
    return start, state
  return 0, train_state.init_state(config, mesh, jax.random.PRNGKey(config.seed))


def _match_ema(config, state, shardings, where, stored_has_ema):
  """Adds or drops the EMA weights so that the state has them iff config.train.ema_decay > 0.

  `state` was restored without them when only one side has them (checkpoint._fit)."""
  if ema.enabled(config) and ema.KEY not in state:
    if stored_has_ema:
      logging.info("%s: the EMA starts from the params (init_what takes no EMA)", where)
    else:
      logging.warning("%s has no EMA weights: config.train.ema_decay=%g starts the average "
                      "from its params", where, config.train.ema_decay)
    state = dict(state, **{ema.KEY: jax.jit(ema.init, out_shardings=shardings[ema.KEY])(
        state["params"])})
  elif not ema.enabled(config) and stored_has_ema:
    logging.warning("%s has EMA weights but config.train.ema_decay=0: they are not restored "
                    "and later checkpoints of this run have none", where)
  return state


def _config_json(config, lineage):
  """The resolved config as JSON, with the fork's lineage (if any) under "lineage"."""
  config_json = config.to_json_best_effort(indent=2)
  if lineage is None:
    return config_json
  return json.dumps(dict(json.loads(config_json), lineage=lineage), indent=2)


def _data_counters(data_iter, previous):
  """Skipped-record counters of the data iterator (by reason, by source), if it has them.

  Warns on the console when the count grew since `previous` (the last log step's count)."""
  counters = getattr(data_iter, "metrics", None)
  if counters is None:
    return {}
  out = counters()
  total = out.get("data/skipped_records", 0)
  if total > previous:
    detail = ", ".join(f"{k[len('data/skipped_'):]} {v}" for k, v in sorted(out.items())
                       if k.startswith("data/skipped_") and k != "data/skipped_records")
    logging.warning("skipped %d bad records so far (%s)", total, detail)
  return out


def _train(config, workdir, mesh, shardings, data_iter, parent, lineage, on_log):
  """The run itself, once the workdir is this run's (locked)."""
  num_patches = (config.model.image.latent_size // config.model.image.patch_size) ** 2
  config_json = _config_json(config, lineage)
  if lineage is not None:
    logging.info("forked from %s step %d (init_what=%s); config differences from the parent: "
                 "%s", lineage["parent_workdir"], lineage["parent_step"], lineage["init_what"],
                 "; ".join(lineage["config_diff"]) or "none")
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "config.json"), config_json)
  ckpt = checkpoint_lib.Checkpointer(
      workdir, keep=config.checkpoint.keep, keep_period=config.checkpoint.keep_period or None,
      async_save=config.checkpoint.async_save)
  try:
    start, state = _restore_or_init(config, ckpt, mesh, shardings, data_iter, parent)
  except BaseException:
    ckpt.close()
    _close(data_iter)
    raise
  jsonl = paths.join(workdir, "metrics", "train.jsonl")
  dropped = metrics_lib.truncate_after(jsonl, start)  # steps after `start` are redone
  if dropped:
    logging.info("dropped %d records after step %d from %s", dropped, start, jsonl)
  writer = metrics_lib.MetricWriter(jsonl, paths.join(workdir, "tb"))
  step_fn = make_train_step(config, mesh, shardings)
  num_params = train_state.param_count(state)
  peak = flops.peak_flops(jax.devices())
  signals = _StopSignals()
  signals.install()

  total = config.train.steps
  log_every = max(config.train.log_every, 1)
  nonfinite_run, skipped, pending, bad_records = 0, 0, None, 0
  window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
  loop_start, step, last = time.perf_counter(), start, {}
  stop_reason = "done"
  # Several hosts stop together (_StopVote, or Orbax's preemption sync point); one alone
  # reads its own signals at each step.
  vote = _StopVote(mesh) if jax.process_count() > 1 else None
  voted, agreed = None, None
  _print(f"training {config.model.num_layers}x{config.model.d_model} "
         f"({train_state.param_count(state) / 1e6:.2f}M params) on {mesh.devices.size} devices "
         f"mesh {dict(mesh.shape)}, steps {start}->{total}, workdir {workdir}")
  try:
    for step in range(start, total):
      if vote is None:
        agreed = signals.reason
      elif agreed is None and ckpt.manager.reached_preemption(step):
        agreed = "preempted"  # a preemption notice every host agreed on for this step
      if agreed is not None:
        stop_reason = agreed
        if vote is not None:
          logging.warning("stop requested (%s) on some host: every host saves step %d and "
                          "stops", agreed, step)
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
      if vote is not None:  # read one step late: waits only for the step before this one
        previous, voted = voted, vote.vote(signals.reason)
        if previous is not None:
          agreed = _StopVote.agreed(previous)
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
        data_counters = _data_counters(data_iter, bad_records)
        bad_records = data_counters.get("data/skipped_records", 0)
        scalars = dict(last, step_time=step_time, tokens_per_s=tokens_per_s,
                       skipped_steps=skipped, **data_counters)
        if peak:  # model FLOPs: attention counted over the pairs the mask allows (last step)
          flops_per_step = flops.train_flops_per_step(config, num_params, last["attn_pairs"])
          scalars["mfu"] = flops_per_step / step_time / peak
          scalars["hfu"] = flops.train_flops_per_step(
              config, num_params, last["attn_pairs_computed"]) / step_time / peak
        writer.write(step + 1, scalars)
        eta = (total - step - 1) * step_time
        mfu = (f" mfu {scalars['mfu'] * 100:.1f}% hfu {scalars['hfu'] * 100:.1f}%" if peak
               else "")
        bad = f" skipped records {bad_records}" if bad_records else ""
        _print(f"step {step + 1}/{total} loss {last['loss']:.4f} text {last['text_loss']:.4f} "
               f"{'image_tokens' if 'image_token_loss' in last else 'image'} "
               f"{last['image_loss']:.4f} grad_norm {last['grad_norm']:.3f} lr {last['lr']:.2e} "
               f"{tokens_per_s:,.0f} tok/s {step_time * 1000:.0f} ms/step{mfu}{bad} "
               f"eta {_fmt_duration(eta)}")
        if on_log is not None:
          on_log(step + 1, scalars)
        window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
      if (step + 1) % config.checkpoint.every_steps == 0 and step + 1 < total:
        writer.flush()  # a remote train.jsonl holds every record up to a resumable step
        ckpt.save(step + 1, state, data_iter.get_state(), config_json)
    else:
      step = total
    if pending is not None:
      nonfinite_run, skipped = _count_nonfinite(pending, nonfinite_run, skipped, step - 1, config)
    final_step = int(jax.device_get(state["step"]))
    ckpt.wait()  # started saves and their keep-N cleanup finish before the directory is listed
    if final_step not in ckpt.all_steps():
      ckpt.save(final_step, state, data_iter.get_state(), config_json, force=True)
  except BaseException:
    signals.restore()
    ckpt.close()  # let started saves finish: they hold good states
    writer.close()
    _close(data_iter)
    raise
  ckpt.close()  # waits for the last save: a second Ctrl-C here still aborts
  signals.restore()
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


class DistributedSetupError(ValueError):
  """The environment asks for several processes but does not say how to connect them."""


_HELP = ("pass --coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or set "
         "JAX_COORDINATOR_ADDRESS and pass the other two), or --num_processes=1 for one process")


def distributed_setup(env, *, coordinator_address=None, num_processes=None, process_id=None,
                      tpu_chips=0):
  """How this process joins the others: -> (why, jax.distributed.initialize kwargs) or None.

  A pure function of the environment `env` (os.environ), the flags and the number of local
  TPU chips, in this order: explicit flags (--num_processes=1 alone: one process, nothing
  detected); JAX_COORDINATOR_ADDRESS; SLURM with more than one task (run through srun);
  GKE / multislice TPU variables (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES with several
  hosts, MEGASCALE_*); and any Cloud TPU VM (TPU chips on this machine, metadata server not
  switched off): jax finds the pod's hosts from the metadata (one host: one process). Raises
  DistributedSetupError (one line saying what to set) when the flags are incomplete or a
  SLURM job of several tasks was not started through srun.
  """
  given = [v is not None for v in (num_processes, process_id)]
  if coordinator_address:
    if not all(given):
      raise DistributedSetupError(f"--coordinator_address needs --num_processes and "
                                  f"--process_id; {_HELP}")
    return "flags", dict(coordinator_address=coordinator_address,
                         num_processes=num_processes, process_id=process_id)
  if num_processes == 1 and process_id in (None, 0):
    return None
  if any(given) and not (all(given) and env.get("JAX_COORDINATOR_ADDRESS")):
    raise DistributedSetupError(f"--num_processes / --process_id without a coordinator; {_HELP}")
  if env.get("JAX_COORDINATOR_ADDRESS"):  # jax reads it; the flags may give the rest
    return "JAX_COORDINATOR_ADDRESS", (
        dict(num_processes=num_processes, process_id=process_id) if all(given) else {})
  tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
  if env.get("SLURM_JOB_ID") and tasks > 1:
    missing = [k for k in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
               if k not in env]
    if missing:
      raise DistributedSetupError(
          f"SLURM job of {tasks} tasks but {', '.join(missing)} unset: start tfusion-train "
          f"through srun (launch/slurm.sbatch does), or {_HELP}")
    return "SLURM", {}
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts or int(env.get("MEGASCALE_NUM_SLICES") or 1) > 1 or env.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "TPU pod (GKE / multislice environment)", {}
  if tpu_chips > 0 and env.get("TPU_SKIP_MDS_QUERY") is None:
    return "Cloud TPU VM", {}
  return None


def _local_tpu_chips():
  """TPU chips on this machine's PCI bus (no backend started); 0 where that cannot be read."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001 - a private helper: its absence means "not known"
    return 0


def initialize_distributed(flags_values):
  """jax.distributed.initialize from the flags or the environment (distributed_setup)."""
  setup = distributed_setup(os.environ, coordinator_address=flags_values.coordinator_address,
                            num_processes=flags_values.num_processes,
                            process_id=flags_values.process_id, tpu_chips=_local_tpu_chips())
  if setup is None:
    return
  why, kwargs = setup
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise DistributedSetupError(f"multi-process start ({why}) failed: {first}; {_HELP}") from None
  logging.info("process %d of %d (%s)", jax.process_index(), jax.process_count(), why)


def main():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logs go")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
  flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's id (with coordinator_address)")
  flags.DEFINE_string("init_from", None, "W1[:STEP]: start a new run from another run's "
                      "checkpoint (default its newest); see tfusion/fork.py")
  flags.DEFINE_enum("init_what", "params", ["params", "params+opt", "all"],
                    "with --init_from: what to take from the parent")
  flags.DEFINE_bool("force_unlock", False, "take over W/LOCK of a run known to be gone")
  flags.mark_flags_as_required(["config", "workdir"])
  from tfusion import config_cli, configlib
  config_cli.define_show_flag()

  def run(argv):
    del argv
    logs.setup_console()  # our lines on stderr (W/logs/ once the run owns W); absl quiet
    try:
      initialize_distributed(flags.FLAGS)
    except DistributedSetupError as e:
      print(f"tfusion-train: error: {e}", file=sys.stderr)
      sys.exit(2)
    try:
      # Relative data/tokenizer/VAE/eval paths are stored absolute in W/config.json.
      out = train_and_evaluate(configlib.absolute_paths(flags.FLAGS.config), flags.FLAGS.workdir,
                               init_from=flags.FLAGS.init_from, init_what=flags.FLAGS.init_what,
                               force_unlock=flags.FLAGS.force_unlock)
    except (ConfigMismatchError, ValueError, FileNotFoundError, FloatingPointError,
            workdir_lock.WorkdirLockedError) as e:
      print(f"tfusion-train: error: {e}", file=sys.stderr)
      sys.exit(2)
    if out["stop_reason"] == "preempted":  # a launcher may requeue on this status
      sys.exit(flags.FLAGS.config.train.preempted_exit_code)

  app.run(run, flags_parser=config_cli.flags_parser("tfusion-train"))


if __name__ == "__main__":
  main()
