"""Metric curves from the jobs' JSONL files: `tfusion-plot --workdir W --out curves.png`.

Plots each metric against the training step (or the training FLOPs recorded by the eval job,
on log-log axes as in scaling-law plots). The last record of a step wins: a resumed run redoes
the steps after its checkpoint.
"""

import argparse
import math
import os

from tfusion import metrics as metrics_lib, paths


def series(records, key, x="step"):
  """[(x, value)] of `key`, one point per step (the last record of each step), sorted."""
  points = {}
  for r in records:
    if key in r and x in r and isinstance(r[key], (int, float)) and math.isfinite(r[key]):
      points[r["step"]] = (r[x], r[key])
  return sorted(points.values())


def plot_curves(panels, out_path, *, title=None, log=False):
  """panels: [(panel title, {label: [(x, y)]})] -> a PNG with one panel per entry."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = max(len(panels), 1)
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (name, lines) in zip(axes.ravel(), panels):
    for label, pts in lines.items():
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None,
                markersize=3, label=label)
    ax.set_title(name, fontsize=10)
    if log:
      ax.set_xscale("log")
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
      ax.legend(fontsize=8)
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def workdir_panels(workdir, x="step"):
  """Panels for the train losses and every eval metric of a workdir."""
  train = metrics_lib.read_jsonl(paths.join(workdir, "metrics", "train.jsonl"))
  evals = metrics_lib.read_jsonl(paths.join(workdir, "metrics", "eval.jsonl"))
  panels = []
  if train and x == "step":
    panels.append(("train losses", {k: series(train, k) for k in
                                    ("loss", "text_loss", "image_loss")}))
  skip = {"step", "suite", "train_flops", "seconds", "settings"}
  keys = sorted({k for r in evals for k, v in r.items()
                 if k not in skip and isinstance(v, (int, float)) and "_tokens/" not in k})
  for key in keys:
    panels.append((key, {key: series(evals, key, x=x)}))
  return panels


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True, help="PNG path")
  parser.add_argument("--x", default="step", choices=("step", "train_flops"),
                      help="x axis; train_flops plots eval metrics log-log")
  args = parser.parse_args(argv)
  panels = workdir_panels(args.workdir, args.x)
  if not panels:
    raise SystemExit(f"no metrics in {args.workdir}/metrics")
  plot_curves(panels, args.out, title=args.workdir, log=args.x == "train_flops")
  print(f"wrote {args.out} ({len(panels)} panels)")


if __name__ == "__main__":
  main()
