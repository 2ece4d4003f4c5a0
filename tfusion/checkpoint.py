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
  Several processes decide together: a step that any of them cannot read is damaged for all,
  process 0 alone moves it, and all of them restore the same earlier step.
* `mode="params_only"` (config.train.restore): a checkpoint whose optimizer state does not fit
  gives its params, step and data position; the caller starts a fresh optimizer state.
* Data iterator states are per process: every process writes its own
  `<step>/data_states/process_<i>-of-<n>.json` inside Orbax's temporary step directory, so
  they are committed with the step or not at all; each process restores its own. A run with
  another process count gets the saved state when every process saved the same one (e.g.
  synthetic data: a step counter), else a one-line `DataStateMismatchError`. Checkpoints of
  earlier versions (one `data` item written by process 0) still restore.
* A workdir may be a URL (gs://...): Orbax and TensorStore write the checkpoints there
  themselves; this module's own files and listings go through tfusion/paths.py.
"""

import dataclasses
import json
import logging
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from tfusion import paths

CHECKPOINT_DIR = "checkpoints"
EMA_KEY = "ema_params"  # tfusion/ema.py (not imported: this module stays free of the model)


def checkpoint_dir(workdir):
  return paths.absolute(paths.join(workdir, CHECKPOINT_DIR))


DATA_ITEM = "data_states"
LEGACY_DATA_ITEM = "data"  # one JSON item written by process 0 (earlier versions)
_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


class DataStateMismatchError(ValueError):
  """The checkpoint's per-process data states do not fit this run's processes (not damage)."""


class DataStatesHandler(ocp.CheckpointHandler):
  """Orbax handler: each process saves and restores its own data iterator state (JSON)."""

  def save(self, directory, args):
    i, n = jax.process_index(), jax.process_count()
    path = paths.join(os.fspath(directory), f"process_{i}-of-{n}.json")
    # Orbax commits the whole step directory after every process returned from save; the
    # rename only keeps a reader of this temporary directory from seeing a torn file.
    paths.write_atomic(path, json.dumps(args.state))

  def restore(self, directory, args=None):
    del args
    return read_data_state(os.fspath(directory), where=os.fspath(directory))

  def metadata(self, directory):
    del directory
    return None

  def close(self):
    pass


@ocp.args.register_with_handler(DataStatesHandler, for_save=True)
@dataclasses.dataclass
class DataStatesSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStatesHandler, for_restore=True)
@dataclasses.dataclass
class DataStatesRestore(ocp.args.CheckpointArgs):
  pass


def saved_process_counts(directory):
  """{process count: {process index: file path}} of the data states in `directory`."""
  out = {}
  for name in paths.listdir(directory):
    m = _STATE_FILE.match(name)
    if m:
      out.setdefault(int(m.group(2)), {})[int(m.group(1))] = paths.join(directory, name)
  return out


def read_data_state(directory, *, where, process_index=None, process_count=None):
  """This process's data iterator state from a `data_states` item directory.

  Another process count: the state every process saved, if they all saved the same one;
  else DataStateMismatchError (one line: what differs, what to do).
  """
  i = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  files = saved_process_counts(directory)
  if i in files.get(n, {}):
    return json.loads(paths.read_text(files[n][i]))
  if len(files) != 1:  # none, or several counts: not what a complete save leaves
    raise FileNotFoundError(f"{directory}: no data state of process {i} of {n} "
                            f"(found counts {sorted(files)})")
  (saved_n, saved), = files.items()
  if saved_n == n or len(saved) != saved_n:  # a file of this run's count is missing: damage
    raise FileNotFoundError(f"{directory}: the data states of processes "
                            f"{sorted(set(range(saved_n)) - set(saved))} of {saved_n} are missing")
  states = []
  for path in saved.values():
    states.append(json.loads(paths.read_text(path)))
  if all(s == states[0] for s in states):  # e.g. synthetic data: one step counter
    return states[0]
  raise DataStateMismatchError(
      f"checkpoint {where} holds the data iterator positions of {saved_n} processes (each "
      f"reads its own record shard) but this run has {n}: the positions do not carry over; "
      f"resume with {saved_n} processes (the same hosts and mesh), or start a new workdir "
      "from these weights with --init_from (fresh data order)")


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
        **{DATA_ITEM: DataStatesSave(data_state)},  # per process (see the module docstring)
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

    Several processes agree on each step: process 0's list of steps is everyone's, and a
    step any process cannot read (each reads its own array shards and data state) is damaged
    for all of them; process 0 alone moves it aside, and all try the previous one.
    """
    _check_mode(mode)
    steps = _same_on_all_processes(self.all_steps())
    for step in reversed(steps):
      restored, error, refusal = None, None, None
      try:
        stored = self.state_metadata(step)
      except Exception as e:  # noqa: BLE001 - metadata missing or unreadable: damaged
        error = e
      else:
        try:
          wanted = self._fit(step, stored, abstract_state, mode)
          restored = self.restore(step, wanted, data=True)
        except (CheckpointStructureError, DataStateMismatchError) as e:
          refusal = e  # another config or process count: not damage
        except Exception as e:  # noqa: BLE001 - the tree fits, so the files are damaged
          if _is_out_of_memory(e):
            refusal = e
          else:
            error = e
      codes = _gather_codes(2 if refusal else 1 if error else 0)
      if max(codes) == 2:
        if refusal is not None:
          raise refusal
        raise RuntimeError(f"process {codes.index(2)} cannot restore {self.directory}/{step} "
                           "(see its log)")
      if max(codes) == 1:
        self._set_aside(step, error or RuntimeError(
            f"unreadable on process(es) {[i for i, c in enumerate(codes) if c]}"))
        continue
      return step, restored["state"], restored["data"]
    return None

  def check_newest(self, abstract_state, *, mode="auto"):
    """Read-only: raises CheckpointStructureError if the newest checkpoint whose tree reads
    does not fit `abstract_state`, DataStateMismatchError if its data states do not fit this
    run's processes (so a job refuses before it writes anything)."""
    _check_mode(mode)
    for step in reversed(self.all_steps()):
      try:
        stored = self.state_metadata(step)
      except Exception:  # noqa: BLE001 - damaged: restore_latest deals with it
        continue
      self._fit(step, stored, abstract_state, mode)
      self.check_data_states(step)
      return

  def _fit(self, step, stored, abstract_state, mode):
    """The subtree to restore from `stored`; raises CheckpointStructureError if none fits.

    EMA weights are optional on both sides (switched on or off at a resume): a checkpoint
    without them restores the rest (the caller starts the average from the params), one with
    them into a config without leaves them out."""
    wanted = dict(abstract_state)
    if (EMA_KEY in stored) != (EMA_KEY in abstract_state):
      wanted.pop(EMA_KEY, None)
      stored = {k: v for k, v in stored.items() if k != EMA_KEY}
    diffs = tree_differences(stored, wanted)
    if not diffs:
      return wanted
    if mode == "params_only" and all(d.startswith("opt_state") for d in diffs):
      return {k: v for k, v in wanted.items() if k != "opt_state"}
    raise CheckpointStructureError(self.directory, step, diffs)

  def restore(self, step, abstract_state, *, data=False):
    """`step`'s state (a subtree of it: {"params"}, {"params", "opt_state"}...) and data."""
    args = {"state": ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=True)}  # the structure was checked (_fit): a subtree is on purpose
    legacy = data and not paths.isdir(paths.join(self.directory, str(step), DATA_ITEM))
    if data and legacy:
      args[LEGACY_DATA_ITEM] = ocp.args.JsonRestore()
    elif data:
      args[DATA_ITEM] = DataStatesRestore()
    # The handler, not the manager: the manager's restore ends in a barrier that a process
    # whose read failed never reaches (restore_latest's vote is the barrier instead).
    handler = ocp.CompositeCheckpointHandler()
    try:
      restored = dict(handler.restore(epath.Path(self.directory) / str(step),
                                      ocp.args.Composite(**args)))
    finally:
      handler.close()
    if data and not legacy:
      restored["data"] = restored.pop(DATA_ITEM)
    return restored

  def check_data_states(self, step):
    """Raises DataStateMismatchError if `step`'s data states do not fit this run's processes
    (read-only, before a job writes anything). Damage is left to restore_latest."""
    directory = paths.join(self.directory, str(step), DATA_ITEM)
    try:
      read_data_state(directory, where=paths.join(self.directory, str(step)))
    except (OSError, ValueError) as e:
      if isinstance(e, DataStateMismatchError):
        raise

  def _set_aside(self, step, error):
    src = paths.join(self.directory, str(step))
    dst = paths.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    logging.warning("checkpoint %s cannot be restored (%s: %s); moving it to %s and using the "
                    "previous one", src, type(error).__name__, str(error)[:300], dst)
    if jax.process_index() == 0 and paths.exists(src):
      paths.move(src, dst)
    if jax.process_count() > 1:  # nobody lists the directory before the move
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"tfusion:set-aside-{step}")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _same_on_all_processes(steps):
  """Process 0's list of steps, on every process (listings may race a move)."""
  if jax.process_count() == 1:
    return steps
  import numpy as np
  from jax.experimental import multihost_utils
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  mine = np.asarray(steps if jax.process_index() == 0 else [0] * n, np.int32).reshape(n)
  return [int(x) for x in multihost_utils.broadcast_one_to_all(mine)] if n else []


def _gather_codes(code):
  """[code of process 0, of process 1, ...]: 0 restored, 1 damaged, 2 refused."""
  if jax.process_count() == 1:
    return [code]
  import numpy as np
  from jax.experimental import multihost_utils
  return [int(c) for c in np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel()]


def _check_mode(mode):
  if mode not in ("auto", "params_only"):
    raise ValueError(f"config.train.restore must be 'auto' or 'params_only', got {mode!r}")


def _is_out_of_memory(error):
  return "RESOURCE_EXHAUSTED" in str(error) or isinstance(error, MemoryError)


class NoEMAWeightsError(ValueError):
  """EMA weights were asked for and the checkpoint has none (its run kept no average)."""


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


def restore_params(workdir, step=None, mesh=None, weights="auto", *, with_source=False):
  """Params only, for eval/generate jobs: -> (params, config ConfigDict, step).

  Restores onto `mesh` with the model's logical shardings (default: a mesh over all local
  devices with data parallelism only, i.e. replicated params). Only complete checkpoints are
  seen; `step=None` takes the newest. weights: "auto" (the EMA weights when the checkpoint
  has them, else the params), "ema" (an error when it has none) or "raw". with_source=True
  appends which ones were restored ("ema" or "raw") to the returned tuple.
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
  from tfusion import ema
  ema.check_weights(weights, "weights")
  has_ema = EMA_KEY in ckpt.state_metadata(step)
  if weights == "ema" and not has_ema:
    raise NoEMAWeightsError(f"checkpoint {ckpt.directory}/{step} has no EMA weights (its run had "
                     "config.train.ema_decay=0); use weights 'raw' or 'auto'")
  source = "ema" if has_ema and weights != "raw" else "raw"
  key = EMA_KEY if source == "ema" else "params"
  abstract = train_state.abstract_state(config, mesh)
  restored = ckpt.restore(step, {key: abstract["params"]})
  params = restored["state"][key]
  return (params, config, step, source) if with_source else (params, config, step)
