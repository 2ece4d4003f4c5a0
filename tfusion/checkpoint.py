"""Checkpoints in W/checkpoints with Orbax: train state, data iterator state, resolved config.

* Saves are asynchronous (the loop only waits for the device->host copy); Orbax writes each
  step to a temporary directory and renames it when complete, so a crash never leaves a
  half-written checkpoint that looks complete.
* Keeps the last `keep` checkpoints, and every `keep_period`-th step forever.
* Restore goes through abstract arrays carrying the *current* shardings, so a checkpoint saved
  on one mesh restores onto another (resharding).
* Restore tells damage from difference. Before restoring, the checkpoint's stored tree
  metadata is compared with the abstract state: a difference in structure or shapes (the
  optimizer state of another optimizer config, another parameter tree) is a
  `CheckpointStructureError` naming the paths that differ; nothing is moved. Only a
  checkpoint whose files are missing or unreadable is damaged: it is moved aside to
  `checkpoints/corrupt-<step>-<time>` with a warning naming it, and the previous one is used.
* `mode="params_only"` (config.train.restore): a checkpoint whose optimizer state does not fit
  gives its params, step and data position; the caller starts a fresh optimizer state.
"""

import json
import logging
import os
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

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
    """Steps of the complete checkpoints now on disk, sorted."""
    for attempt in range(5):
      try:
        self.manager.reload()
        break
      except FileNotFoundError:  # a step deleted while listed (a trainer's keep-N cleanup)
        if attempt == 4:
          raise
        time.sleep(0.2)
    return sorted(self.manager.all_steps())

  def save(self, step, state, data_state, config_json, *, force=False):
    """Starts saving (async). Returns True if a save was started."""
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),  # PyTree*, not Standard*: partial restores too
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json)))
    return self.manager.save(step, args=args, force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def restore_config(self, step):
    """The resolved config (as a dict) stored with `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
        "config"]

  def state_metadata(self, step):
    """The stored tree of `step`'s train state: nested dicts/lists, leaves ArrayMetadata."""
    path = epath.Path(self.directory) / str(step) / "state"
    return ocp.StandardCheckpointHandler().metadata(path).tree

  def restore_latest(self, abstract_state, *, mode="auto"):
    """Restores the newest restorable checkpoint onto `abstract_state`'s shardings.

    Returns (step, state, data_state) or None when there is no checkpoint. With
    mode="params_only", a checkpoint whose optimizer state differs yields a state without
    "opt_state" (params and step only). Raises CheckpointStructureError on any other
    difference; damaged checkpoints are set aside (see the module docstring).
    """
    _check_mode(mode)
    for step in reversed(self.all_steps()):
      try:
        stored = self.state_metadata(step)
      except Exception as e:  # noqa: BLE001 - metadata missing or unreadable: damaged
        self._set_aside(step, e)
        continue
      wanted = self._fit(step, stored, abstract_state, mode)
      try:
        restored = self.restore(step, wanted, data=True)
      except Exception as e:  # noqa: BLE001 - the tree fits, so the files are damaged
        if _is_out_of_memory(e):
          raise
        self._set_aside(step, e)
        continue
      return step, restored["state"], restored["data"]
    return None

  def check_newest(self, abstract_state, *, mode="auto"):
    """Read-only: raises CheckpointStructureError if the newest checkpoint whose tree reads
    does not fit `abstract_state` (so a job refuses before it writes anything)."""
    _check_mode(mode)
    for step in reversed(self.all_steps()):
      try:
        stored = self.state_metadata(step)
      except Exception:  # noqa: BLE001 - damaged: restore_latest deals with it
        continue
      self._fit(step, stored, abstract_state, mode)
      return

  def _fit(self, step, stored, abstract_state, mode):
    """The subtree to restore from `stored`; raises CheckpointStructureError if none fits."""
    diffs = tree_differences(stored, abstract_state)
    if not diffs:
      return abstract_state
    if mode == "params_only" and all(d.startswith("opt_state") for d in diffs):
      return {"params": abstract_state["params"], "step": abstract_state["step"]}
    raise CheckpointStructureError(self.directory, step, diffs)

  def restore(self, step, abstract_state, *, data=False):
    """`step`'s state (a subtree of it: {"params"}, {"params", "opt_state"}...) and data."""
    args = {"state": ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=set(abstract_state) != {"params", "opt_state", "step"})}
    if data:
      args["data"] = ocp.args.JsonRestore()
    return self.manager.restore(step, args=ocp.args.Composite(**args))

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


def _check_mode(mode):
  if mode not in ("auto", "params_only"):
    raise ValueError(f"config.train.restore must be 'auto' or 'params_only', got {mode!r}")


def _is_out_of_memory(error):
  return "RESOURCE_EXHAUSTED" in str(error) or isinstance(error, MemoryError)


class CheckpointStructureError(ValueError):
  """The checkpoint's train state has another structure than the config's (not damage)."""

  def __init__(self, directory, step, diffs, *, hint=(), limit=12):
    self.directory, self.step, self.diffs = directory, step, diffs
    shown = "\n  ".join(diffs[:limit]) + (f"\n  ... and {len(diffs) - limit} more"
                                          if len(diffs) > limit else "")
    if hint:  # e.g. the config keys that differ from the checkpoint's stored config
      shown += "\nConfig keys that differ from the checkpoint's:\n  " + "\n  ".join(hint)
    only_opt = all(d.startswith("opt_state") for d in diffs)
    choices = ("--config.train.restore=params_only to restore the params (and step, data "
               "position) and start a fresh optimizer state, or " if only_opt else "")
    super().__init__(
        f"checkpoint {directory}/{step} holds a train state of another structure than this "
        f"config builds ({len(diffs)} difference(s); nothing was moved or changed):\n  {shown}"
        f"\nChoices: {choices}use a new workdir, or the config the checkpoint was saved with.")


def _flat_signature(tree):
  """{path: "empty" | shape} of a train state or stored metadata tree (namedtuples as dicts).

  Empty nodes count: two optimizers can differ only in an empty state (optax's masked
  weight decay adds {"inner_state": EmptyState()}), and Orbax refuses those too.
  """
  out = {}

  def walk(node, path):
    if hasattr(node, "_fields"):  # a NamedTuple (optax states) is stored as a dict
      node = dict(zip(node._fields, node))
    if isinstance(node, dict):
      if not node:
        out[path or "/"] = "empty"
      for k, v in node.items():
        walk(v, f"{path}/{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
      if not node:
        out[path or "/"] = "empty"
      for i, v in enumerate(node):
        walk(v, f"{path}/{i}" if path else str(i))
    elif node is None:
      out[path] = "empty"
    else:
      out[path] = tuple(node.shape)

  walk(tree, "")
  return out


def tree_differences(stored, abstract):
  """Lines naming each path that differs between a stored tree and an abstract state."""
  a, b = _flat_signature(stored), _flat_signature(abstract)
  diffs = []
  for path in sorted(set(a) | set(b)):
    if path not in b:
      diffs.append(f"{path}: in the checkpoint, not in the config's state")
    elif path not in a:
      diffs.append(f"{path}: in the config's state, not in the checkpoint")
    elif a[path] != b[path]:
      diffs.append(f"{path}: checkpoint {_show(a[path])}, config {_show(b[path])}")
  return diffs


def _show(sig):
  return sig if sig == "empty" else f"shape {list(sig)}"


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
  restored = ckpt.restore(step, {"params": abstract["params"]})
  return restored["state"]["params"], config, step
