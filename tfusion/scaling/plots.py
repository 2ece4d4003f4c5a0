"""The scaling plots: metric vs FLOPs per family with trendlines and parity, isoFLOP curves,
and fit residuals. Each function writes one PNG and returns its path (matplotlib, Agg)."""

import os

import numpy as np

from tfusion.scaling import fit as fit_lib


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, plt, out_path):
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def _sci(x):
  return f"{x:.2e}".replace("e+", "e")


def plot_trends(points, trends, out_path, *, metric, x_label="training FLOPs", parity=None):
  """The paper's figure style: one panel, log-log, a scatter and a fitted line per family.

  points: {family: [(flops, metric)]}; trends: {family: trendline dict (fit.trendline) or
  None}; parity: the CLI's parity dict (families, target, ratio, ci, flops_a, flops_b) or None,
  drawn as a dashed horizontal line at the target with both families' crossing points.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 4.4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (family, pts) in enumerate(points.items()):
    color = colors[i % len(colors)]
    p = np.asarray(pts, np.float64).reshape(-1, 2)
    ax.scatter(p[:, 0], p[:, 1], color=color, s=22, zorder=3)
    trend = trends.get(family)
    label = family
    if trend is not None:
      lo, hi = np.log(trend["x_min"]), np.log(trend["x_max"])
      span = max(hi - lo, 1e-9)
      xs = np.exp(np.linspace(lo - 0.1 * span, hi + 0.1 * span, 50))
      ax.plot(xs, fit_lib.trend_value(trend, xs), color=color, lw=1.5)
      label = f"{family}: slope {trend['slope']:.3f}, r2 {trend['r2']:.2f}"
    ax.plot([], [], color=color, marker="o", label=label)
  if parity is not None and parity.get("ratio") is not None:
    a, b = parity["families"]
    ax.axhline(parity["target"], color="gray", ls="--", lw=1)
    ax.scatter([parity["flops_a"], parity["flops_b"]], [parity["target"]] * 2, marker="x",
               color="black", zorder=4)
    ci = parity.get("ci")
    ci_text = f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
    ax.set_title(f"{a} reaches {b}'s {metric} = {parity['target']:.4g}\nwith "
                 f"{parity['ratio']:.3g}x{ci_text} of the compute", fontsize=9)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(x_label)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return _save(fig, plt, out_path)


def plot_isoflops(minima_by_family, out_path, *, metric):
  """One panel per family: metric vs N per compute budget, each budget's parabola and vertex.

  minima_by_family: {family: fit.isoflop_minima(...) dict}.
  """
  plt = _pyplot()
  n = max(len(minima_by_family), 1)
  fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 3.8), squeeze=False)
  for ax, (family, iso) in zip(axes[0], minima_by_family.items()):
    for m in iso["minima"]:
      x = np.log(m["N"])
      xs = np.linspace(min(x.min(), np.log(m["N_opt"])), max(x.max(), np.log(m["N_opt"])), 50)
      line, = ax.plot(np.exp(xs), np.polyval(m["coef"], xs), lw=1)
      ax.scatter(m["N"], m["L"], color=line.get_color(), s=16, label=f"C={_sci(m['C'])}")
      ax.scatter([m["N_opt"]], [m["L_opt"]], color=line.get_color(), marker="*", s=80)
    for s in iso["skipped"]:
      ax.scatter(s["N"], s["L"], color="lightgray", s=12)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(metric)
    ax.set_title(f"{family}: isoFLOP minima ({len(iso['minima'])} budgets)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if iso["minima"]:
      ax.legend(fontsize=7)
  return _save(fig, plt, out_path)


def plot_residuals(residuals, out_path, *, metric):
  """log(observed / fitted) per point against FLOPs, one marker series per (family, fit).

  residuals: {label: [(flops, log residual)]}.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.0, 3.6))
  for label, pts in residuals.items():
    p = np.asarray(pts, np.float64).reshape(-1, 2)
    ax.scatter(p[:, 0], p[:, 1], s=18, label=label)
  ax.axhline(0.0, color="gray", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel(f"log({metric} observed / fitted)")
  ax.grid(alpha=0.3, which="both")
  if residuals:
    ax.legend(fontsize=8)
  return _save(fig, plt, out_path)
