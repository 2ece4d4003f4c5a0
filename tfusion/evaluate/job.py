"""`tfusion-eval --workdir W [--config C] [--once] [--suites fid,clip,caption,ppl,mc]`.

Watches W/checkpoints and evaluates every complete checkpoint once per suite, oldest first:
restores the params on its own mesh (one device), runs the suites (tfusion/evaluate/suites.py),
appends one line per (step, suite) to W/metrics/eval.jsonl (with the settings used and the
training FLOPs at that step, for scaling plots) and TensorBoard (W/tb/eval). What is done is
recorded in W/metrics/eval_state.json after each suite, so a killed watcher restarted later
neither redoes nor skips work. Orbax only exposes a checkpoint once it is completely written,
so a checkpoint being saved is never read. Without --once it stops after evaluating the
run's final step (config.train.steps).
"""

import json
import os
import sys
import time

from tfusion import checkpoint as checkpoint_lib
from tfusion import flops, metrics as metrics_lib
from tfusion.evaluate import suites as suites_lib

STATE_FILE = "eval_state.json"


def _state_path(workdir):
  return os.path.join(workdir, "metrics", STATE_FILE)


def load_done(workdir):
  """{step: set of suites} already evaluated."""
  path = _state_path(workdir)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {int(k): set(v) for k, v in json.load(f)["done"].items()}


def _save_done(workdir, done):
  path = _state_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"done": {str(k): sorted(v) for k, v in sorted(done.items())}}, f)
  os.replace(tmp, path)  # atomic: a crash leaves the old or the new state, never half of one


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


def evaluate_checkpoint(workdir, step, suites, *, config=None, done=None, writer=None, log=print):
  """Runs `suites` on checkpoint `step`; returns {suite: metrics}. Records progress in `done`."""
  import jax
  from tfusion import sharding, train_state

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  params, stored, _ = checkpoint_lib.restore_params(workdir, step, mesh=mesh)
  cfg = _with_eval_overrides(stored, config)
  ctx = suites_lib.EvalContext(cfg, params, step, workdir)
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
  return results


def run(workdir, suites, *, config=None, once=False, poll_seconds=30.0, final_step=None,
        log=print):
  """The watcher loop. Returns the steps evaluated in this call."""
  for name in suites:
    if name not in suites_lib.SUITES:
      raise ValueError(f"unknown eval suite {name!r}; known: {sorted(suites_lib.SUITES)}")
  done = load_done(workdir)
  writer = metrics_lib.MetricWriter(os.path.join(workdir, "metrics", "eval.jsonl"),
                                    os.path.join(workdir, "tb", "eval"))
  evaluated = []
  try:
    while True:
      steps = (checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps()
               if os.path.isdir(checkpoint_lib.checkpoint_dir(workdir)) else [])
      todo = [s for s in steps if not set(suites) <= done.get(s, set())]
      for step in todo:
        evaluate_checkpoint(workdir, step, suites, config=config, done=done, writer=writer,
                            log=log)
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

  config_flags.DEFINE_config_file("config", None, "config file[:arg] (default: the run's own)")
  flags.DEFINE_string("workdir", None, "the training run's directory")
  flags.DEFINE_bool("once", False, "evaluate the checkpoints present now, then exit")
  flags.DEFINE_string("suites", None, "comma-separated suites (default config.eval.suites)")
  flags.mark_flags_as_required(["workdir"])

  def _run(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    f = flags.FLAGS
    config = f.config
    if config is None:
      path = os.path.join(f.workdir, "config.json")
      if not os.path.exists(path):
        print(f"tfusion-eval: error: no --config and no {path}", file=sys.stderr)
        sys.exit(2)
      import ml_collections
      with open(path, encoding="utf-8") as fh:
        config = ml_collections.ConfigDict(json.load(fh))
    suites = suites_lib._split(f.suites or config.eval.suites)
    try:
      run(f.workdir, suites, config=config, once=f.once, poll_seconds=config.eval.poll_seconds,
          final_step=config.train.steps)
    except (ValueError, FileNotFoundError) as e:
      print(f"tfusion-eval: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_run, argv=argv)


if __name__ == "__main__":
  main()
