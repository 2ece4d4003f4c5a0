"""The registry of a sweep: one JSON line per (run, evaluated step) in S/runs.jsonl.

Built only from what the sweep directory holds: S/sweep.json (the expanded runs, written by
tfusion-sweep) and each run's workdir S/runs/<name> (config.json, metrics/train.jsonl,
metrics/eval.jsonl, checkpoints/). A row:

  {"run", "family", "size", "budget", "params", "params_nonembed", "step", "final",
   "tokens", "text_tokens", "image_patches", "flops_6nd", "flops", "metrics": {name: value}}

tokens = step * batch_size * seq_len (positions seen, padding included). text_tokens and
image_patches are estimated: the mean of the per-step `text_tokens` (positions with a text
loss) and `images` counts over the logged training steps up to that step, times the step
(images times patches per image). flops_6nd = 6 * params_nonembed * tokens; flops is the
eval job's recorded `train_flops` at that step when present (attention counted densely), else
step * the run's FLOPs per step. final: the step is the run's last (its spec steps). Where a
(step, suite) was evaluated twice (a resumed eval job), the last record wins.
"""

import json
import os

SWEEP_FILE = "sweep.json"
RUNS_FILE = "runs.jsonl"
# Fields of eval.jsonl records that are not metrics.
_NOT_METRICS = ("step", "suite", "train_flops", "seconds", "settings")


def run_dir(sweep_dir, name):
  return os.path.join(sweep_dir, "runs", name)


def read_sweep(sweep_dir):
  """S/sweep.json as a dict, or None when the directory holds none."""
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_jsonl(path):
  from tfusion import metrics as metrics_lib
  return metrics_lib.read_jsonl(path)


def _read_json(path):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def checkpoint_steps(workdir):
  """Steps of the checkpoints in workdir/checkpoints (directory names; Orbax writes a step's
  directory under a temporary name and renames it when complete)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def evaluated(workdir):
  """{step: {"metrics": {...}, "suites": set, "train_flops": float or None}} from eval.jsonl;
  for a (step, suite) recorded twice, the last record wins."""
  by_step = {}
  for record in _read_jsonl(os.path.join(workdir, "metrics", "eval.jsonl")):
    if "suite" not in record or "step" not in record:
      continue
    entry = by_step.setdefault(int(record["step"]), {"by_suite": {}, "train_flops": None})
    entry["by_suite"][record["suite"]] = {
        k: v for k, v in record.items()
        if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if record.get("train_flops") is not None:
      entry["train_flops"] = float(record["train_flops"])
  out = {}
  for step, entry in by_step.items():
    metrics = {}
    for values in entry["by_suite"].values():
      metrics.update(values)
    out[step] = {"metrics": metrics, "suites": set(entry["by_suite"]),
                 "train_flops": entry["train_flops"]}
  return out


def _mean_counts(train_records, step):
  """Mean per-step (text_tokens, images) over logged steps <= step (None when none)."""
  logged = [r for r in train_records if r.get("step", 0) <= step and "text_tokens" in r]
  if not logged:
    return None, None
  text = sum(float(r["text_tokens"]) for r in logged) / len(logged)
  images = sum(float(r.get("images", 0.0)) for r in logged) / len(logged)
  return text, images


def run_rows(run, workdir, suites):
  """(rows, missing reason or None) of one run (a dict of sweep.json's "runs")."""
  if not os.path.isdir(workdir):
    return [], "not started"
  config = _read_json(os.path.join(workdir, "config.json")) or {}
  data, image = config.get("data", {}), config.get("model", {}).get("image", {})
  positions = (data["batch_size"] * data["seq_len"] if "batch_size" in data
               else run["tokens"] // run["steps"])
  patches = ((image["latent_size"] // image["patch_size"]) ** 2 if "latent_size" in image
             else None)
  train_records = _read_jsonl(os.path.join(workdir, "metrics", "train.jsonl"))
  rows = []
  evals = evaluated(workdir)
  for step in sorted(evals):
    entry = evals[step]
    text, images = _mean_counts(train_records, step)
    tokens = step * positions
    rows.append({
        "run": run["name"], "family": run["family"], "size": run["size"],
        "budget": run["budget"], "params": run["params"],
        "params_nonembed": run["params_nonembed"], "step": step,
        "final": step == run["steps"], "tokens": tokens,
        "text_tokens": None if text is None else text * step,
        "image_patches": None if images is None or patches is None else images * patches * step,
        "flops_6nd": float(6 * run["params_nonembed"] * tokens),
        "flops": (entry["train_flops"] if entry["train_flops"] is not None
                  else run["flops"] / run["steps"] * step),
        "metrics": entry["metrics"],
    })
  final = evals.get(run["steps"])
  trained = max(checkpoint_steps(workdir), default=0)
  if final is None:
    what = (f"final step {run['steps']} not evaluated" if evals
            else "no checkpoint evaluated yet")
    return rows, f"{what} (trained to step {trained} of {run['steps']})"
  lacking = [s for s in suites if s not in final["suites"]]
  if lacking:
    return rows, f"final step {run['steps']} lacks suites {','.join(lacking)}"
  return rows, None


def collect(sweep_dir):
  """Rebuilds S/runs.jsonl from the sweep directory. Returns (rows, [(run name, reason)]) with
  a reason for every run that is not finished and evaluated for all of the sweep's suites."""
  sweep = read_sweep(sweep_dir)
  if sweep is None:
    raise FileNotFoundError(f"{os.path.join(sweep_dir, SWEEP_FILE)} does not exist: not a "
                            "sweep directory (tfusion-sweep SPEC --dir S --run makes one)")
  suites = sweep.get("eval_suites", [])
  rows, missing = [], []
  for run in sweep["runs"]:
    found, reason = run_rows(run, run_dir(sweep_dir, run["name"]), suites)
    rows.extend(found)
    if reason:
      missing.append((run["name"], reason))
  path = os.path.join(sweep_dir, RUNS_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)  # readers (fits, plots) never see half a registry
  return rows, missing
