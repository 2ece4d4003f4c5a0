"""Forks for ablations: a new run that starts from another run's checkpoint.

`tfusion-train --config C --workdir W2 --init_from W1[:STEP] --init_what WHAT` takes from W1's
checkpoint STEP (default: its newest)
* params:      the parameters; a fresh optimizer state, step 0, data from the start;
* params+opt:  also the optimizer state (Adam moments and count), step 0, data from the start;
               the schedule's own counter restarts with the step, so the lr this run uses is
               schedule(step + config.optim.schedule_offset), as for `params`;
* all:         parameters, optimizer state, step and data iterator position (an exact
               continuation, in another workdir, with another config where it allows).
With params+opt and all, the parent's EMA weights (tfusion/ema.py) come along when both runs
keep one; otherwise a fork's EMA starts from its first params.
The parent is opened read-only and never written to. The lineage (parent workdir, step, what
was taken, config keys that differ from the parent's) goes into W2/config.json under
"lineage", into every checkpoint's stored config, and into the first log lines.

Schedules (tfusion/optim.py): continue the parent's schedule with
`--config.optim.schedule_offset=S` (params, params+opt), re-warm with 0, or branch off a
cool-down (WSD) with `--config.optim.cooldown_steps=N` (and `cooldown_start=S` for `all`).
"""

import json

import jax
import jax.numpy as jnp
import optax

from tfusion import checkpoint as checkpoint_lib
from tfusion import optim, paths

INIT_WHAT = ("params", "params+opt", "all")


def parse_init_from(spec):
  """"W1" or "W1:STEP" -> (absolute workdir, step or None); W1 may be a URL (gs://b/run)."""
  path, sep, step = spec.rpartition(":")
  if sep and step.isdigit() and path:
    return paths.absolute(path), int(step)
  return paths.absolute(spec), None


def check_not_self(spec, workdir):
  if parse_init_from(spec)[0] == paths.absolute(workdir):
    raise ValueError(f"--init_from {spec} is this run's own workdir; a fork needs a new one")


def with_fresh_optimizer(config, shardings, params, step):
  """{params, fresh opt_state (tx.init, sharded like the params' moments), step}.

  The schedule's counter starts at `step`, so the lr continues from there (optax reads the
  lr at its own counter, not at the train step)."""
  tx, _ = optim.make_optimizer(config.optim)
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  opt_state = set_schedule_count(opt_state, step)
  return {"params": params, "opt_state": opt_state,
          "step": jax.device_put(jnp.asarray(step, jnp.int32), shardings["step"])}


def set_schedule_count(opt_state, step):
  """Sets optax's schedule counters (ScaleByScheduleState.count) to `step`; Adam's count
  (its bias correction belongs to its moments) is kept."""

  def reset(node):
    if isinstance(node, optax.ScaleByScheduleState):
      count = jnp.full_like(node.count, step)
      return optax.ScaleByScheduleState(count=jax.device_put(count, node.count.sharding))
    return node

  return jax.tree.map(reset, opt_state,
                      is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))


def flat_config(tree, prefix=""):
  """{"a.b": value} of a config JSON dict (lists kept whole)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_diff(parent, child, labels=("parent", "this run")):
  """Lines `key: parent X, this run Y` for every config key that differs (lineage excluded)."""
  a = flat_config({k: v for k, v in parent.items() if k != "lineage"})
  b = flat_config({k: v for k, v in child.items() if k != "lineage"})
  return [f"{k}: {labels[0]} {a.get(k, '<missing>')!r}, {labels[1]} {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


class Parent:
  """A read-only view of the run a fork starts from."""

  def __init__(self, spec, init_what, workdir):
    if init_what not in INIT_WHAT:
      raise ValueError(f"--init_what must be one of {', '.join(INIT_WHAT)}, got {init_what!r}")
    self.workdir, step = parse_init_from(spec)
    self.init_what = init_what
    check_not_self(spec, workdir)
    self.ckpt = checkpoint_lib.Checkpointer(self.workdir, read_only=True)
    steps = self.ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"--init_from {spec}: no complete checkpoint in "
                              f"{self.ckpt.directory}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"--init_from {spec}: no checkpoint {step} in "
                              f"{self.ckpt.directory} (have {steps})")
    self.step = steps[-1] if step is None else step
    self.config = self.ckpt.restore_config(self.step)
    self.has_ema = checkpoint_lib.EMA_KEY in self.ckpt.state_metadata(self.step)

  def lineage(self, config):
    current = json.loads(config.to_json_best_effort())
    return {"parent_workdir": self.workdir, "parent_step": self.step,
            "init_what": self.init_what, "config_diff": config_diff(self.config, current)}

  def check(self, abstract):
    """Raises CheckpointStructureError if what this fork takes does not fit `abstract`.

    Returns the subtree of `abstract` to restore."""
    wanted = {"params": abstract["params"]}
    if self.init_what != "params":
      wanted["opt_state"] = abstract["opt_state"]
    if self.init_what == "all":
      wanted["step"] = abstract["step"]
    if self.init_what != "params" and self.has_ema and checkpoint_lib.EMA_KEY in abstract:
      wanted[checkpoint_lib.EMA_KEY] = abstract[checkpoint_lib.EMA_KEY]  # part of training state
    diffs = [d for d in checkpoint_lib.tree_differences(
        self.ckpt.state_metadata(self.step), abstract) if d.split("/")[0] in wanted]
    if diffs:  # e.g. params+opt across another optimizer setting
      raise checkpoint_lib.CheckpointStructureError(self.ckpt.directory, self.step, diffs)
    return wanted

  def init_state(self, config, abstract, shardings):
    """-> (state, data_state or None, start step) for this run's first step."""
    wanted = self.check(abstract)
    restored = self.ckpt.restore(self.step, wanted, data=self.init_what == "all")
    state = restored["state"]
    if self.init_what == "params":
      return with_fresh_optimizer(config, shardings, state["params"], 0), None, 0
    if self.init_what == "params+opt":
      step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
      return (dict(state, opt_state=set_schedule_count(state["opt_state"], 0), step=step),
              None, 0)
    return state, restored["data"], self.step

  def close(self):
    self.ckpt.close()
