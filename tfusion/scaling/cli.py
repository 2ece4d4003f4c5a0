"""`tfusion-scaling fit S [--metric M] ...`: scaling-law fits of a sweep's registry.

Reads S/runs.jsonl (rebuilt first from the run workdirs when S/sweep.json is there) and fits,
per family, on each run's final evaluated checkpoint (`--checkpoints all` adds the others,
resampled with their run):
  trend     the paper's log-metric vs log-FLOPs line per family, bootstrap CIs on slope and
            intercept, and the compute-parity ratio of two families (--parity A,B) at a target
            metric (default: B's trendline at B's largest run, i.e. "A reaches B's best with
            ratio x the compute"), with its bootstrap CI;
  chinchilla L(N, D) = E + A/N^alpha + B/D^beta (Huber on log residuals, multi-start L-BFGS),
            bootstrap CIs and the compute-optimal exponents N* ~ C^a, D* ~ C^b (loss-like
            metrics only; N = non-embedding parameters, D = tokens);
  isoflop   per compute budget (runs within --budget-rtol of one FLOPs count) a parabola of the
            metric in log N and its minimum; N* and D* against C as power laws.
Writes OUT/fit.json (default OUT = S/scaling/<metric>) and OUT/trend.png, OUT/residuals.png,
OUT/isoflop.png (when any budget has >= 3 sizes). Runs that are missing or unfinished are
listed (and recorded in fit.json); the fits use what there is. Each part that cannot be fitted
says why in one line and is recorded as {"error": ...}; exit 2 when nothing could be fitted or
the input is unusable.
"""

import argparse
import json
import os
import sys

import numpy as np

from tfusion.scaling import fit as fit_lib
from tfusion.scaling import registry

PROG = "tfusion-scaling"
X_AXES = ("flops_6nd", "flops")
# Metric names whose values grow as models improve; everything else (losses, perplexity, FID)
# is taken as lower-is-better unless --higher-is-better says otherwise.
_HIGHER_WORDS = ("acc", "clip", "cider", "bleu", "score", "judge")


class ScalingInputError(ValueError):
  """The registry cannot be fitted as asked (one line)."""


def guess_higher_is_better(metric):
  name = metric.lower()
  return any(w in name for w in _HIGHER_WORDS)


def load_rows(sweep_dir):
  """(rows, missing [(run, reason)]) of a sweep directory (or a runs.jsonl path)."""
  if os.path.isfile(sweep_dir):
    path, sweep_dir = sweep_dir, None
  else:
    path = os.path.join(sweep_dir, registry.RUNS_FILE)
  if sweep_dir is not None and registry.read_sweep(sweep_dir) is not None:
    return registry.collect(sweep_dir)
  if not os.path.exists(path):
    raise ScalingInputError(f"{path} does not exist: not a sweep directory (tfusion-sweep SPEC "
                            "--dir S --run or --collect writes S/runs.jsonl)")
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ScalingInputError(f"{path}:{i}: not JSON ({e.msg})") from None
  return rows, []


def select_points(rows, metric, x_axis, checkpoints="final"):
  """{family: [row]} of the rows with a finite `metric` and x; ScalingInputError when none."""
  if not rows:
    raise ScalingInputError("the registry has no rows yet: no run has an evaluated checkpoint")
  known = sorted({k for r in rows for k in r.get("metrics", {})})
  if metric not in known:
    raise ScalingInputError(f"no run has metric {metric!r}; the registry has: "
                            f"{', '.join(known) or 'none'}")
  by_family = {}
  for r in rows:
    if checkpoints == "final" and not r.get("final"):
      continue
    y, x = r.get("metrics", {}).get(metric), r.get(x_axis)
    if isinstance(y, (int, float)) and np.isfinite(y) and x is not None and x > 0:
      by_family.setdefault(r["family"], []).append(r)
  if not by_family:
    raise ScalingInputError(f"no {'final ' if checkpoints == 'final' else ''}checkpoint has a "
                            f"finite {metric!r}; finished runs are needed (or --checkpoints all)")
  return by_family


def _try(part, fn, log):
  try:
    return fn()
  except ValueError as e:
    log(f"{part}: cannot fit: {e}")
    return {"error": str(e)}


def _xy(rows, metric, x_axis):
  return [(r[x_axis], r["metrics"][metric]) for r in rows]


def fit_trends(by_family, metric, x_axis, *, parity_families, target, higher_is_better,
               n_boot, seed, log):
  """{"families": {f: bootstrap_trend or error}, "parity": {...} or error or None}."""
  out = {"families": {}}
  for family, rows in by_family.items():
    out["families"][family] = _try(
        f"trend {family}",
        lambda rows=rows: fit_lib.bootstrap_trend(
            _xy(rows, metric, x_axis), n_boot=n_boot, seed=seed,
            groups=[r["run"] for r in rows]), log)
  if parity_families is None:
    out["parity"] = None
    return out
  a, b = parity_families

  def parity():
    fit_b = out["families"][b]
    if target is None and "error" in fit_b:
      raise ValueError(f"no default target: family {b} has no trendline")
    value = target if target is not None else float(
        fit_lib.trend_value(fit_b["fit"], fit_b["fit"]["x_max"]))
    res = fit_lib.bootstrap_trend_and_parity(
        _xy(by_family[a], metric, x_axis), _xy(by_family[b], metric, x_axis), value,
        n_boot=n_boot, seed=seed, higher_is_better=higher_is_better,
        groups_a=[r["run"] for r in by_family[a]], groups_b=[r["run"] for r in by_family[b]],
        names=(a, b))
    return dict(res["parity"], families=[a, b],
                target_source="--target" if target is not None else f"{b}'s trendline at its "
                "largest run")
  out["parity"] = _try(f"parity {a} vs {b}", parity, log)
  return out


def fit_chinchilla(by_family, metric, *, n_boot, seed, log):
  """{family: bootstrap_chinchilla + compute-optimal exponents, or error}."""
  out = {}
  for family, rows in by_family.items():
    final = [r for r in rows if r.get("final")]
    def one(final=final):
      N = [r["params_nonembed"] for r in final]
      D = [r["tokens"] for r in final]
      L = [r["metrics"][metric] for r in final]
      res = fit_lib.bootstrap_chinchilla(N, D, L, n_boot=n_boot, seed=seed)
      lhat = fit_lib.chinchilla_log_predict(np.asarray(res["fit"]["theta"]), np.log(N),
                                            np.log(D))
      res["residuals"] = [[r["flops_6nd"], float(np.log(r["metrics"][metric]) - lh)]
                          for r, lh in zip(final, lhat)]
      return res
    out[family] = _try(f"chinchilla {family}", one, log)
  return out


def fit_isoflops(by_family, metric, *, rtol, log):
  """{family: isoflop_minima + N*/D* power laws (when >= 2 minima), or error}."""
  out = {}
  for family, rows in by_family.items():
    final = [r for r in rows if r.get("final")]
    def one(final=final):
      iso = fit_lib.isoflop_minima(
          [(r["flops_6nd"], r["params_nonembed"], r["metrics"][metric]) for r in final],
          rtol=rtol)
      if len(iso["minima"]) >= 2:
        C = [m["C"] for m in iso["minima"]]
        iso["n_opt_law"] = fit_lib.fit_power_law(C, [m["N_opt"] for m in iso["minima"]])
        iso["d_opt_law"] = fit_lib.fit_power_law(C, [m["D_opt"] for m in iso["minima"]])
      elif not iso["minima"]:
        log(f"isoflop {family}: no budget with >= 3 model sizes within {rtol:.0%} of one FLOPs "
            f"count ({len(iso['skipped'])} budget(s) skipped); a spec with "
            "budgets {'flops': C} gives isoFLOP runs")
      return iso
    out[family] = _try(f"isoflop {family}", one, log)
  return out


def _parity_families(arg, families):
  if arg:
    names = [s.strip() for s in arg.split(",")]
    if len(names) != 2:
      raise ScalingInputError(f"--parity takes two families A,B; got {arg!r}")
    unknown = [n for n in names if n not in families]
    if unknown:
      raise ScalingInputError(f"--parity: unknown famil{'ies' if len(unknown) > 1 else 'y'} "
                              f"{', '.join(unknown)}; the registry has {', '.join(families)}")
    return tuple(names)
  return tuple(families[:2]) if len(families) >= 2 else None


def run_fit(args, log=print):
  """Fits, writes OUT/fit.json and the plots; returns the result dict."""
  rows, missing = load_rows(args.dir)
  # Finished runs whose final evaluation lacks the metric (e.g. a suite added later).
  missing += [(r["run"], f"no {args.metric!r} at its final step {r['step']}") for r in rows
              if r.get("final") and args.metric not in r.get("metrics", {})
              and any(args.metric in o.get("metrics", {}) for o in rows)]
  for name, reason in missing:
    log(f"missing: {name}: {reason}")
  by_family = select_points(rows, args.metric, args.x, args.checkpoints)
  if args.families:
    wanted = [s.strip() for s in args.families.split(",")]
    unknown = [f for f in wanted if f not in by_family]
    if unknown:
      raise ScalingInputError(f"--families: no points for {', '.join(unknown)}; the registry "
                              f"has {', '.join(by_family)}")
    by_family = {f: by_family[f] for f in wanted}
  higher = (guess_higher_is_better(args.metric) if args.higher_is_better is None
            else args.higher_is_better)
  parity_families = _parity_families(args.parity, list(by_family))
  result = {
      "metric": args.metric, "x": args.x, "checkpoints": args.checkpoints,
      "higher_is_better": higher, "missing": [{"run": n, "reason": r} for n, r in missing],
      "points": {f: [{k: r[k] for k in ("run", "size", "budget", "params_nonembed", "tokens",
                                        "step", "flops_6nd", "flops")}
                     | {"value": r["metrics"][args.metric]} for r in rs]
                 for f, rs in by_family.items()},
  }
  result["trend"] = fit_trends(by_family, args.metric, args.x, parity_families=parity_families,
                               target=args.target, higher_is_better=higher,
                               n_boot=args.n_boot, seed=args.seed, log=log)
  if higher:
    result["chinchilla"] = {"error": f"{args.metric} is higher-is-better: the Chinchilla law "
                                     "models a loss"}
    result["isoflop"] = result["chinchilla"]
  else:
    result["chinchilla"] = fit_chinchilla(by_family, args.metric,
                                          n_boot=min(args.n_boot, args.chinchilla_boot),
                                          seed=args.seed, log=log)
    result["isoflop"] = fit_isoflops(by_family, args.metric, rtol=args.budget_rtol, log=log)
  fitted = [f for f, t in result["trend"]["families"].items() if "error" not in t]
  if not fitted:
    reasons = "; ".join(f"{f}: {t['error']}" for f, t in result["trend"]["families"].items())
    raise ScalingInputError(f"no family could be fitted ({reasons})")
  out = args.out or os.path.join(args.dir if os.path.isdir(args.dir) else
                                 os.path.dirname(args.dir), "scaling",
                                 args.metric.replace("/", "_"))
  result["plots"] = write_plots(result, by_family, args, out)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "fit.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  result["path"] = path
  return result


def write_plots(result, by_family, args, out):
  from tfusion.scaling import plots
  paths = {}
  points = {f: _xy(rows, args.metric, args.x) for f, rows in by_family.items()}
  trends = {f: (None if "error" in t else t["fit"])
            for f, t in result["trend"]["families"].items()}
  parity = result["trend"]["parity"]
  paths["trend"] = plots.plot_trends(
      points, trends, os.path.join(out, "trend.png"), metric=args.metric,
      x_label="training FLOPs (6ND)" if args.x == "flops_6nd" else "training FLOPs",
      parity=None if parity is None or "error" in parity else parity)
  residuals = {}
  for f, t in trends.items():
    if t is not None:
      residuals[f"{f} trend"] = [
          (x, float(np.log(y) - np.log(fit_lib.trend_value(t, x)))) for x, y in points[f]]
  chin = result["chinchilla"]
  if "error" not in chin:
    for f, c in chin.items():
      if "error" not in c:
        residuals[f"{f} L(N,D)"] = c["residuals"]
  paths["residuals"] = plots.plot_residuals(residuals, os.path.join(out, "residuals.png"),
                                            metric=args.metric)
  iso = result["isoflop"]
  if "error" not in iso and any(v.get("minima") for v in iso.values()):
    paths["isoflop"] = plots.plot_isoflops({f: v for f, v in iso.items() if "error" not in v},
                                           os.path.join(out, "isoflop.png"), metric=args.metric)
  return paths


def summary(result):
  """Lines a researcher reads first."""
  lines = [f"{result['metric']} vs {result['x']} ({result['checkpoints']} checkpoints)"]
  for f, t in result["trend"]["families"].items():
    if "error" in t:
      continue
    fit, ci = t["fit"], t["slope_ci"]
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    lines.append(f"  trend {f}: log y = {fit['intercept']:.3f} + {fit['slope']:.4f} log C"
                 f"{ci_text}, r2 {fit['r2']:.3f}, {fit['n']} runs")
  p = result["trend"]["parity"]
  if p and "error" not in p:
    ci = p["ci"]
    lines.append(f"  parity: {p['families'][0]} reaches {p['target']:.4g} with {p['ratio']:.3g}x"
                 f" the compute of {p['families'][1]}"
                 + (f" (95% CI [{ci[0]:.3g}, {ci[1]:.3g}])" if ci else " (no CI)")
                 + (" (extrapolated)" if p["extrapolated"] else ""))
  chin = result["chinchilla"]
  if "error" not in chin:
    for f, c in chin.items():
      if "error" in c:
        continue
      fit = c["fit"]
      lines.append(f"  L(N,D) {f}: E {fit['E']:.4g}, alpha {fit['alpha']:.3f}, beta "
                   f"{fit['beta']:.3f}, N* ~ C^{fit['a']:.3f}, D* ~ C^{fit['b']:.3f}"
                   if fit["a"] is not None else f"  L(N,D) {f}: E {fit['E']:.4g} (flat)")
  iso = result["isoflop"]
  if "error" not in iso:
    for f, v in iso.items():
      if "n_opt_law" in v:
        lines.append(f"  isoflop {f}: N* ~ C^{v['n_opt_law']['exponent']:.3f}, D* ~ "
                     f"C^{v['d_opt_law']['exponent']:.3f} ({len(v['minima'])} budgets)")
  plots = ", ".join(os.path.basename(p) for p in result["plots"].values())
  lines.append(f"  -> {result['path']} ({plots})")
  return lines


def _parser():
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  f = sub.add_parser("fit", help="fit a sweep's registry")
  f.add_argument("dir", help="the sweep directory S (or a runs.jsonl file)")
  f.add_argument("--metric", default="loss/image", help="the eval metric to fit")
  f.add_argument("--x", choices=X_AXES, default="flops_6nd",
                 help="compute axis: the paper's 6ND (default) or the exact count")
  f.add_argument("--families", default=None, help="comma-separated families (default: all)")
  f.add_argument("--parity", default=None,
                 help="A,B: the compute ratio A needs over B (default: the first two families)")
  f.add_argument("--target", type=float, default=None, help="metric value for the parity")
  hib = f.add_mutually_exclusive_group()
  hib.add_argument("--higher-is-better", dest="higher_is_better", action="store_true",
                   default=None)
  hib.add_argument("--lower-is-better", dest="higher_is_better", action="store_false")
  f.add_argument("--checkpoints", choices=("final", "all"), default="final")
  f.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws for the trendlines")
  f.add_argument("--chinchilla-boot", type=int, default=200,
                 help="bootstrap draws for the L(N, D) fit (each a multi-start L-BFGS)")
  f.add_argument("--budget-rtol", type=float, default=0.05,
                 help="runs within this relative FLOPs difference share an isoFLOP budget")
  f.add_argument("--seed", type=int, default=0)
  f.add_argument("--out", default=None, help="output directory (default S/scaling/<metric>)")
  return parser


def main(argv=None):
  """The CLI: 0 on success, 2 on unusable input (one line on stderr)."""
  args = _parser().parse_args(argv)
  try:
    if args.n_boot < 1 or args.chinchilla_boot < 1:
      raise ScalingInputError("--n-boot and --chinchilla-boot must be >= 1")
    result = run_fit(args)
  except (ScalingInputError, FileNotFoundError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  for line in summary(result):
    print(line)
  return 0


if __name__ == "__main__":
  sys.exit(main())
