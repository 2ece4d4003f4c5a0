"""`tfusion-eval --workdir W [--config C] [--once] [--suites fid,clip,caption,ppl,mc]`.

Watches W/checkpoints and evaluates every complete checkpoint once per suite, oldest first:
restores the params on its own mesh (this process's devices, config.eval.mesh: one by
default), runs the suites (tfusion/evaluate/suites.py), appends one line per (step, suite) to
W/metrics/eval.jsonl (with the settings used and the training FLOPs at that step, for scaling
plots) and TensorBoard (W/tb/eval). What is done is
recorded in W/metrics/eval_state.json after each suite, so a killed watcher restarted later
neither redoes nor skips work.

Several processes (every host of a pod, started like tfusion-train: --coordinator_address,
--num_processes, --process_id, or the environment): each restores the params onto its own
devices and generates its share of the prompts (suites.py); process 0 alone writes results
and eval_state.json. Orbax only exposes a checkpoint once it is completely written,
so a checkpoint being saved is never read. Without --once it stops after evaluating the
run's final step (config.train.steps).

Safety: every suite's inputs (SUITE_INPUTS: files exist, weights given) are checked before
any suite runs, failing in one line naming the config key. A checkpoint that cannot be
restored (a file deleted or corrupted) is skipped with a warning naming it, and the watcher
goes on to the next. `--config` defaults to the run's stored config (W/config.json, else the
newest checkpoint's), so `--config.eval.key=value` overrides work on their own.
"""

import json
import os
import sys
import time

from tfusion import checkpoint as checkpoint_lib
from tfusion import ema
from tfusion import flops, metrics as metrics_lib, paths
from tfusion.evaluate import suites as suites_lib

STATE_FILE = "eval_state.json"

# What each suite reads: (config key, kind). Kinds: file, dir, path (file or directory),
# files (comma-separated files), records (ArrayRecord files/dirs/globs); a tuple of keys
# means "at least one of them". Scripts that register a suite may add its entry here.
SUITE_INPUTS = {
    "fid": [("eval.prompts", "file"), ("eval.fid_weights", "file"),
            ("eval.fid_reference", "dir"), ("data.tokenizer", "file"), ("vae.path", "path")],
    "clip": [("eval.prompts", "file"), ("eval.clip_weights", "file"),
             ("data.tokenizer", "file"), ("vae.path", "path")],
    "caption": [("eval.caption_records", "records"), ("data.tokenizer", "file")],
    "ppl": [("eval.ppl_files", "files"), ("data.tokenizer", "file")],
    "mc": [("eval.mc_tasks", "files"), ("data.tokenizer", "file")],
    "loss": [(("eval.loss_text", "eval.loss_image_caption", "eval.loss_interleaved"), "records"),
             ("data.tokenizer", "file")],
}


class DamagedCheckpointError(RuntimeError):
  """A checkpoint that Orbax lists but cannot restore (the message names it)."""


def _get(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      return ""
    node = node[part]
  return node


def _input_problem(key, kind, value):
  from tfusion.data import records
  parts = [p.strip() for p in str(value).split(",") if p.strip()] if kind != "records" else [value]
  for part in parts:
    if kind == "records":
      try:
        records.resolve_paths(part, key=f"config.{key}")
      except FileNotFoundError as e:
        return str(e)
    elif kind == "dir" and not os.path.isdir(part):
      return f"config.{key}: {part!r} is not a directory"
    elif kind in ("file", "files") and not os.path.isfile(part):
      return f"config.{key}: {part!r} does not exist"
    elif kind == "path" and not os.path.exists(part):
      return f"config.{key}: {part!r} does not exist"
  return None


def check_inputs(config, suites, *, eval_keys_only=False):
  """Raises ValueError (one line, naming config keys) when a suite's inputs are missing.

  eval_keys_only: check config.eval.* only (the run's stored config, not yet written, may
  still supply data.tokenizer and vae.path).
  """
  problems = []
  for suite in suites:
    for keys, kind in SUITE_INPUTS.get(suite, []):
      keys = (keys,) if isinstance(keys, str) else keys
      if eval_keys_only and not keys[0].startswith("eval."):
        continue
      given = [(k, _get(config, k)) for k in keys if _get(config, k)]
      if not given:
        problem = (f"suite {suite} needs config.{' or config.'.join(keys)}, which "
                   f"{'is' if len(keys) == 1 else 'are'} empty")
      else:
        problem = next((p for k, v in given if (p := _input_problem(k, kind, v))), None)
      if problem and problem not in problems:
        problems.append(problem if problem.startswith("suite") else f"{problem} (suite {suite})")
  if problems:
    raise ValueError("; ".join(problems))


def _state_path(workdir):
  return paths.join(workdir, "metrics", STATE_FILE)


def load_done(workdir):
  """{step: set of suites} already evaluated: eval_state.json, plus every (step, suite) that
  eval.jsonl already holds (a watcher killed between writing a result and saving the state
  must not evaluate that suite again)."""
  path = _state_path(workdir)
  done = {}
  if paths.exists(path):
    done = {int(k): set(v) for k, v in json.loads(paths.read_text(path))["done"].items()}
  for record in metrics_lib.read_jsonl(paths.join(workdir, "metrics", "eval.jsonl")):
    if "suite" in record:
      done.setdefault(int(record["step"]), set()).add(record["suite"])
  return done


def _save_done(workdir, done):
  import jax
  if jax.process_index() != 0:  # every process keeps `done` in memory; process 0 writes it
    return
  path = _state_path(workdir)
  paths.makedirs(paths.dirname(path))
  # atomic: a crash leaves the old or the new state, never half of one
  paths.write_atomic(path, json.dumps({"done": {str(k): sorted(v)
                                                for k, v in sorted(done.items())}}))


def _with_eval_overrides(stored, config):
  """The checkpoint's config with `config.eval` (and data.tokenizer, vae.path) from `config`."""
  if config is None:
    return stored
  stored = stored.copy_and_resolve_references()
  stored.eval = config.eval
  if config.data.tokenizer:
    stored.data.tokenizer = config.data.tokenizer
  if config.vae.path:
    stored.vae.path = config.vae.path
  return stored


def local_mesh(eval_config=None):
  """This process's mesh for eval (config.eval.mesh over jax.local_devices(); -1 fills)."""
  import jax
  from tfusion import sharding
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  given = eval_config.get("mesh") if eval_config is not None else None
  sizes.update({a: int(given[a]) for a in sizes if given is not None and a in given})
  devices = jax.local_devices()
  if -1 not in sizes.values():
    need = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if need > len(devices):
      raise ValueError(f"config.eval.mesh {sizes} needs {need} devices; this process has "
                       f"{len(devices)}")
    devices = devices[:need]
  return sharding.make_mesh(sizes, devices=devices)


def evaluate_checkpoint(workdir, step, suites, *, config=None, done=None, writer=None, log=print):
  """Runs `suites` on checkpoint `step`; returns {suite: metrics}. Records progress in `done`."""
  from tfusion import train_state

  mesh = local_mesh(config.eval if config is not None else None)
  weights = config.eval.get("weights", "auto") if config is not None else "auto"
  ema.check_weights(weights)
  try:
    params, stored, _, source = checkpoint_lib.restore_params(workdir, step, mesh=mesh,
                                                              weights=weights, with_source=True)
  except checkpoint_lib.NoEMAWeightsError as e:  # config.eval.weights=ema: not damage
    raise checkpoint_lib.NoEMAWeightsError(f"config.eval.weights=ema: {e}") from None
  except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for missing/corrupt files
    where = paths.join(checkpoint_lib.checkpoint_dir(workdir), str(step))
    raise DamagedCheckpointError(f"checkpoint {where} cannot be restored "
                                 f"({type(e).__name__}: {str(e)[:200]})") from e
  cfg = _with_eval_overrides(stored, config)
  check_inputs(cfg, suites)
  ctx = suites_lib.EvalContext(cfg, params, step, workdir, log=log, mesh=mesh)
  ctx.settings["weights"] = source  # recorded with every result: ema or raw
  train_flops = step * flops.train_flops_per_step(cfg, train_state.param_count(params))
  return run_suites(ctx, suites, train_flops=train_flops, done=done, writer=writer, log=log)


def run_suites(ctx, suites, *, train_flops, done=None, writer=None, log=print):
  """Runs `suites` (those not yet in `done`) on one EvalContext; returns {suite: metrics}.

  Each result goes to `writer` and into `done` (saved at once) as soon as its suite finishes,
  so a crash loses at most the suite that was running.
  """
  results = {}
  for name in suites:
    if done is not None and name in done.get(ctx.step, set()):
      continue
    start = time.perf_counter()
    values = suites_lib.SUITES[name](ctx)
    seconds = time.perf_counter() - start
    results[name] = values
    if writer is not None:
      writer.write(ctx.step, values,
                   suite=name, train_flops=train_flops, seconds=round(seconds, 2),
                   settings=dict(ctx.settings))
      writer.flush()
    if done is not None:
      done.setdefault(ctx.step, set()).add(name)
      _save_done(ctx.workdir, done)
    shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
    log(f"eval step {ctx.step} {name}: {shown} ({seconds:.0f}s)")
  ctx.clear_samples()  # kept only so that a killed job resumes its sampling
  return results


def run(workdir, suites, *, config=None, once=False, poll_seconds=30.0, final_step=None,
        log=print):
  """The watcher loop. Returns the steps evaluated in this call."""
  for name in suites:
    if name not in suites_lib.SUITES:
      raise ValueError(f"unknown eval suite {name!r}; known: {sorted(suites_lib.SUITES)}")
  if config is not None:  # fail before waiting for checkpoints, with the run's own paths
    from tfusion import config_cli
    stored = config_cli.load_run_config(workdir) if paths.isdir(workdir) else None
    if stored is not None:
      check_inputs(_with_eval_overrides(stored, config), suites)
    else:
      check_inputs(config, suites, eval_keys_only=True)
  done = load_done(workdir)
  damaged = set()  # steps skipped in this call (retried by a restarted watcher)
  writer = metrics_lib.MetricWriter(paths.join(workdir, "metrics", "eval.jsonl"),
                                    paths.join(workdir, "tb", "eval"))
  evaluated = []
  try:
    while True:
      steps = (checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps()
               if paths.isdir(checkpoint_lib.checkpoint_dir(workdir)) else [])
      todo = [s for s in steps if not set(suites) <= done.get(s, set()) and s not in damaged]
      for step in todo:
        try:
          evaluate_checkpoint(workdir, step, suites, config=config, done=done, writer=writer,
                              log=log)
        except DamagedCheckpointError as e:
          damaged.add(step)
          log(f"eval: warning: {e}; skipped")
          continue
        evaluated.append(step)
      if once:
        return evaluated
      if final_step is not None and final_step in steps and not todo:
        return evaluated
      time.sleep(poll_seconds)
  finally:
    writer.close()


def main(argv=None):
  from absl import app, flags
  from ml_collections import config_flags
  from tfusion import config_cli

  argv = list(sys.argv if argv is None else argv)
  workdir = config_cli.argv_value(argv, "workdir")
  stored = None
  if workdir and config_cli.argv_value(argv, "config") is None:
    try:  # --config defaults to the run's own, so --config.eval.* overrides stand alone
      stored = config_cli.load_run_config(workdir)
    except config_cli.ConfigError as e:
      config_cli.fail("tfusion-eval", str(e))
  if stored is not None:
    config_cli.define_config_dict("tfusion-eval", stored, "config file[:arg] (default: the "
                                  "run's stored config, W/config.json)", argv)
  else:
    config_flags.DEFINE_config_file("config", None, "config file[:arg] (default: the run's own)",
                                    sys_argv=argv)
  flags.DEFINE_string("workdir", None, "the training run's directory")
  flags.DEFINE_bool("once", False, "evaluate the checkpoints present now, then exit")
  flags.DEFINE_string("suites", None, "comma-separated suites (default config.eval.suites)")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
  flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator_address)")
  flags.DEFINE_integer("process_id", None, "this process's id (with coordinator_address)")
  flags.mark_flags_as_required(["workdir"])
  config_cli.define_show_flag()

  def _run(argv):
    del argv
    from tfusion import logs
    from tfusion import train as train_lib
    f = flags.FLAGS
    try:  # every host of a pod runs tfusion-eval; they split the sampling (suites.py)
      train_lib.initialize_distributed(f)
    except train_lib.DistributedSetupError as e:
      config_cli.fail("tfusion-eval", str(e))
    logs.setup_job_logging(f.workdir, "eval")  # the watcher's decisions, on screen and in W/logs/
    config = f.config
    if config is None:
      config_cli.fail("tfusion-eval", f"no --config and no {paths.join(f.workdir, 'config.json')}"
                      " or checkpoint to take the run's config from")
    suites = suites_lib._split(f.suites or config.eval.suites)
    try:
      run(f.workdir, suites, config=config, once=f.once, poll_seconds=config.eval.poll_seconds,
          final_step=config.train.steps)
    except (ValueError, FileNotFoundError) as e:
      config_cli.fail("tfusion-eval", str(e))

  app.run(_run, argv=argv, flags_parser=config_cli.flags_parser("tfusion-eval"))


if __name__ == "__main__":
  main()
