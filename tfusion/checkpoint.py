"""Checkpoints in W/checkpoints with Orbax: train state, data iterator state, resolved config.

* Saves are asynchronous (the loop only waits for the device->host copy); Orbax writes each
  step to a temporary directory and renames it when complete, so a crash never leaves a
  half-written checkpoint that looks complete.
* Keeps the last `keep` checkpoints, and every `keep_period`-th step forever.
* Restore goes through abstract arrays carrying the *current* shardings, so a checkpoint saved
  on one mesh restores onto another (resharding).
* A latest checkpoint that fails to restore (files missing or corrupted) is moved aside to
  `checkpoints/corrupt-<step>` with a warning naming it, and the previous one is used.
"""

import json
import logging
import os
import time

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir):
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


class Checkpointer:
  """Owns the CheckpointManager of one workdir."""

  def __init__(self, workdir, *, keep=3, keep_period=None, async_save=True, read_only=False):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step, state, data_state, config_json, *, force=False):
    """Starts saving (async). Returns True if a save was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json)))
    return self.manager.save(step, args=args, force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def restore_config(self, step):
    """The resolved config (as a dict) stored with `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def restore_latest(self, abstract_state):
    """Restores the newest restorable checkpoint onto `abstract_state`'s shardings.

    Returns (step, state, data_state) or None when there is no checkpoint.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], restored["data"]
      except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
        if _is_shape_mismatch(e):
          raise
        self._set_aside(step, e)
    return None

  def _set_aside(self, step, error):
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    logging.warning("checkpoint %s cannot be restored (%s: %s); moving it to %s and using the "
                    "previous one", src, type(error).__name__, str(error)[:300], dst)
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _is_shape_mismatch(error):
  text = str(error)
  return "shape" in text.lower() and ("mismatch" in text.lower() or "expected" in text.lower())


def restore_params(workdir, step=None, mesh=None):
  """Params only, for eval/generate jobs: -> (params, config ConfigDict, step).

  Restores onto `mesh` with the model's logical shardings (default: a mesh over all local
  devices with data parallelism only, i.e. replicated params). Only complete checkpoints are
  seen; `step=None` takes the newest.
  """
  import ml_collections
  from tfusion import train_state

  ckpt = Checkpointer(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {ckpt.directory} (have {steps})")
  config = ml_collections.ConfigDict(ckpt.restore_config(step))
  if mesh is None:
    from tfusion import sharding
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  abstract = train_state.abstract_state(config, mesh)
  params_only = {"params": abstract["params"]}
  restored = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=params_only,
          restore_args=ocp.checkpoint_utils.construct_restore_args(params_only),
          partial_restore=True)))
  return restored["state"]["params"], config, step
