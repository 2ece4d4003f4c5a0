"""Scaling-law fits: trendlines and compute parity, Chinchilla's parametric law, isoFLOP minima.

Everything is numpy/scipy on small arrays (one point per run); all logs are natural logs.

Trendlines (Zhou et al. 2024, Transfusion, Fig. 2 and Table 3): each metric against training
FLOPs on log-log axes, one least-squares line of log y on log x per model family:
  log y = intercept + slope * log C.
A compute-parity ratio inverts two such lines at one metric value `target`:
  log C_f(target) = (log target - intercept_f) / slope_f,   ratio = C_a(target) / C_b(target)
("Transfusion reaches Chameleon's FID with 1/34 of the compute": ratio 0.029).

Chinchilla approach 3 (Hoffmann et al. 2022, eq. 2 and appendix D.2):
  L(N, D) = E + A / N^alpha + B / D^beta
fitted in log space with parameters (a, b, e) = log (A, B, E) and alpha, beta:
  log L_hat = logsumexp(a - alpha log N, b - beta log D, e)
minimising sum_i Huber_delta(log L_hat_i - log L_i) (delta = 1e-3) with L-BFGS-B from a grid
of starts, keeping the best. Compute-optimal allocation under C = 6 N D (their eq. 4):
  N_opt = G (C/6)^a,  D_opt = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1/(alpha+beta)),
  a = beta / (alpha + beta),  b = alpha / (alpha + beta).

IsoFLOP minima (Hoffmann approach 2): per compute budget C, a parabola of L in log N; its vertex
is N*(C), D* = C / (6 N*); then N* and D* against C as power laws (exponents ~ a and b).

Bootstrap CIs resample runs (points) with replacement and take percentile intervals.
Degenerate inputs raise ValueError with one line saying what is wrong and what is needed.
"""

import itertools

import numpy as np
from scipy import optimize, special

# Hoffmann et al.'s initialisation grid (appendix D.2): 5 * 5 * 5 * 6 * 6 = 4500 starts.
PAPER_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
# Parameter vector order of the Chinchilla objective.
THETA = ("a", "b", "e", "alpha", "beta")
# Exponents are kept in [0, 5] (negative ones make the law grow with scale); logs are free.
_BOUNDS = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
MIN_CHINCHILLA_POINTS = 6  # more points than the 5 parameters


# ------------------------------------------------------------------------------- helpers


def _positive(name, values):
  """values as a float64 vector, or ValueError when any is not finite and > 0 (logs are taken)."""
  v = np.asarray(values, np.float64).reshape(-1)
  bad = v[~(np.isfinite(v) & (v > 0))]
  if bad.size:
    raise ValueError(f"{name} must be finite and > 0 (its log is taken); got {bad.size} bad "
                     f"value(s), e.g. {bad[:3].tolist()}")
  return v


def _same_length(**arrays):
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"inputs must have the same length; got {lengths}")


def _line(lx, ly):
  """Least-squares (slope, intercept) of ly on lx (1-D, >= 2 distinct lx)."""
  mx, my = lx.mean(), ly.mean()
  dx = lx - mx
  slope = float(np.dot(dx, ly - my) / np.dot(dx, dx))
  return slope, float(my - slope * mx)


def _interval(samples, level):
  """Percentile interval [lo, hi] of the finite samples at `level` (None when there are none)."""
  s = np.asarray(samples, np.float64)
  s = s[np.isfinite(s)]
  if not s.size:
    return None
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(s, [tail, 100.0 - tail])
  return [float(lo), float(hi)]


def _groups_of(n, groups):
  """[index array] per resampling unit: each point alone, or the points sharing a label."""
  if groups is None:
    return [np.array([i]) for i in range(n)]
  labels = list(groups)
  if len(labels) != n:
    raise ValueError(f"groups must label every point: {len(labels)} labels for {n} points")
  by_label = {}
  for i, g in enumerate(labels):
    by_label.setdefault(g, []).append(i)
  return [np.array(v) for v in by_label.values()]


def _resample(rng, units):
  """Indices of one bootstrap resample: len(units) units drawn with replacement."""
  picks = rng.integers(len(units), size=len(units))
  return np.concatenate([units[i] for i in picks])


# ----------------------------------------------------------------------------- trendlines


def trendline(x, y):
  """Least-squares line of log y on log x (natural logs), the paper's log-log trendline.

  x: [n] compute (FLOPs), y: [n] metric, both > 0 with >= 2 distinct x.
  Returns dict(slope, intercept, r2, n, x_min, x_max): log y = intercept + slope * log x, the
  r^2 of that regression in log space, and the x range the line was fitted on.
  """
  x, y = _positive("x (compute)", x), _positive("y (metric)", y)
  _same_length(x=x, y=y)
  lx, ly = np.log(x), np.log(y)
  if np.unique(lx).size < 2:
    raise ValueError(f"a trendline needs >= 2 distinct x values; got {x.size} point(s) at "
                     f"x = {np.unique(x)[:3].tolist()}")
  slope, intercept = _line(lx, ly)
  ss_res = float(np.sum((ly - intercept - slope * lx) ** 2))
  ss_tot = float(np.sum((ly - ly.mean()) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
  return {"slope": slope, "intercept": intercept, "r2": r2, "n": int(x.size),
          "x_min": float(x.min()), "x_max": float(x.max())}


def trend_value(fit, x):
  """The trendline's metric at compute x (scalar or array)."""
  return np.exp(fit["intercept"] + fit["slope"] * np.log(x))


def _check_improves(name, slope, higher_is_better):
  improves = slope > 0 if higher_is_better else slope < 0
  if not improves:
    way = "increase" if higher_is_better else "decrease"
    raise ValueError(f"parity undefined: the metric of {name} does not {way} with compute "
                     f"(trendline slope {slope:.3g}); a compute ratio needs both families to "
                     "improve with compute")


def parity_ratio(fit_a, fit_b, target, *, higher_is_better=False, names=("a", "b")):
  """Compute family A needs to reach metric `target` over what family B needs.

  fit_a, fit_b: trendline() dicts. Each line is inverted at the target,
  log C = (log target - intercept) / slope; the metric must improve with compute for both
  (slope < 0, or > 0 when higher_is_better), else parity is undefined (ValueError).
  Targets beyond a family's fitted x range are allowed (power-law extrapolation) and flagged.
  Returns dict(ratio, flops_a, flops_b, target, extrapolated, extrapolated_families).
  """
  target = float(target)
  if not (np.isfinite(target) and target > 0):
    raise ValueError(f"the parity target must be finite and > 0 (its log is taken); "
                     f"got {target}")
  log_c = []
  for name, fit in zip(names, (fit_a, fit_b)):
    _check_improves(name, fit["slope"], higher_is_better)
    log_c.append((np.log(target) - fit["intercept"]) / fit["slope"])
  flops = [float(np.exp(v)) for v in log_c]
  extrapolated = [name for name, fit, c in zip(names, (fit_a, fit_b), flops)
                  # (a relative 1e-9 of slack: a target read off a line at its own end)
                  if "x_min" in fit
                  and not fit["x_min"] * (1 - 1e-9) <= c <= fit["x_max"] * (1 + 1e-9)]
  return {"ratio": float(np.exp(log_c[0] - log_c[1])), "flops_a": flops[0],
          "flops_b": flops[1], "target": target, "extrapolated": bool(extrapolated),
          "extrapolated_families": extrapolated}


def _boot_lines(points, units, rng, n_boot):
  """[n_boot, 2] (slope, intercept) of resampled lines; NaN rows where all x are equal."""
  lx, ly = np.log(points[:, 0]), np.log(points[:, 1])
  out = np.full((n_boot, 2), np.nan)
  for i in range(n_boot):
    idx = _resample(rng, units)
    if np.ptp(lx[idx]) > 0:  # a resample of a single x has no line: skipped
      out[i] = _line(lx[idx], ly[idx])
  return out


def _as_points(points, name):
  p = np.asarray(points, np.float64)
  if p.ndim != 2 or p.shape[1] != 2:
    raise ValueError(f"{name} must be a sequence of (flops, metric) pairs; got shape {p.shape}")
  return p


def _trend_summary(fit, lines, level):
  ok = np.isfinite(lines[:, 0])
  return {"fit": fit, "slope_ci": _interval(lines[ok, 0], level),
          "intercept_ci": _interval(lines[ok, 1], level), "n_used": int(ok.sum())}


def bootstrap_trend(points, *, n_boot=1000, seed=0, ci=0.95, groups=None):
  """One family's trendline with percentile CIs from resampling its runs.

  points: [(flops, metric)]; groups: optional label per point (e.g. the run name when a run
  contributes several checkpoints) so that whole runs are resampled together.
  Returns dict(fit, slope_ci, intercept_ci, n_used, n_boot, ci); resamples with a single x are
  skipped (n_used counts the rest).
  """
  p = _as_points(points, "points")
  fit = trendline(p[:, 0], p[:, 1])
  lines = _boot_lines(p, _groups_of(len(p), groups), np.random.default_rng(seed), n_boot)
  return dict(_trend_summary(fit, lines, ci), n_boot=int(n_boot), ci=ci)


def bootstrap_trend_and_parity(points_a, points_b, target, *, n_boot=1000, seed=0, ci=0.95,
                               higher_is_better=False, groups_a=None, groups_b=None,
                               names=("a", "b")):
  """Trendlines of two families and their parity ratio at `target`, with bootstrap CIs.

  points_a, points_b: [(flops, metric)] per family. Each bootstrap draw resamples the runs of
  each family with replacement (within the family; whole groups when groups_* label points)
  and refits both lines; the target is held fixed. Draws where a family's resample has a single
  x are skipped (degenerate), and draws where a resampled slope does not improve with compute
  are left out of the parity CI (parity undefined there); both counts are reported.
  Returns dict(a=..., b=... (bootstrap_trend-like), parity=dict(parity_ratio(...), ci, n_used,
  n_skipped_degenerate, n_skipped_undefined), n_boot, ci).
  """
  pa, pb = _as_points(points_a, "points_a"), _as_points(points_b, "points_b")
  fit_a, fit_b = trendline(pa[:, 0], pa[:, 1]), trendline(pb[:, 0], pb[:, 1])
  parity = parity_ratio(fit_a, fit_b, target, higher_is_better=higher_is_better, names=names)
  rng = np.random.default_rng(seed)
  lines_a = _boot_lines(pa, _groups_of(len(pa), groups_a), rng, n_boot)
  lines_b = _boot_lines(pb, _groups_of(len(pb), groups_b), rng, n_boot)
  valid = np.isfinite(lines_a[:, 0]) & np.isfinite(lines_b[:, 0])
  sign = 1.0 if higher_is_better else -1.0
  improves = valid & (sign * lines_a[:, 0] > 0) & (sign * lines_b[:, 0] > 0)
  lt = np.log(parity["target"])
  with np.errstate(divide="ignore", invalid="ignore"):
    log_ratio = ((lt - lines_a[:, 1]) / lines_a[:, 0]) - ((lt - lines_b[:, 1]) / lines_b[:, 0])
  # Percentiles commute with exp: the interval of the log ratio, exponentiated.
  log_ci = _interval(log_ratio[improves], ci)
  parity.update(ci=None if log_ci is None else [float(np.exp(v)) for v in log_ci],
                n_used=int(improves.sum()), n_skipped_degenerate=int((~valid).sum()),
                n_skipped_undefined=int((valid & ~improves).sum()))
  return {"a": _trend_summary(fit_a, lines_a, ci), "b": _trend_summary(fit_b, lines_b, ci),
          "parity": parity, "n_boot": int(n_boot), "ci": ci}


# ------------------------------------------------------------------- Chinchilla approach 3


def huber(r, delta):
  """Huber loss per residual: r^2 / 2 within |r| <= delta, delta (|r| - delta / 2) beyond."""
  r = np.abs(r)
  return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def _log_terms(theta, lnN, lnD):
  """[..., 3, n] the three log terms of L_hat; theta [..., 5] in THETA order."""
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  return np.stack([a - alpha * lnN, b - beta * lnD, e + 0 * lnN], axis=-2)


def chinchilla_log_predict(theta, lnN, lnD):
  """log L_hat = logsumexp(a - alpha log N, b - beta log D, e); theta [..., 5] -> [..., n]."""
  return special.logsumexp(_log_terms(np.asarray(theta, np.float64), lnN, lnD), axis=-2)


def _objective(theta, lnN, lnD, lnL, delta):
  """(sum Huber / delta, gradient): the division keeps L-BFGS-B's tolerances meaningful when
  delta is small (the minimiser is unchanged)."""
  terms = _log_terms(theta, lnN, lnD)
  lhat = special.logsumexp(terms, axis=0)
  r = lhat - lnL
  w = np.exp(terms - lhat)  # softmax weights: d lhat / d term
  dr = np.clip(r, -delta, delta) / delta  # Huber'(r) / delta
  grad = np.array([np.dot(dr, w[0]), np.dot(dr, w[1]), np.dot(dr, w[2]),
                   -np.dot(dr, w[0] * lnN), -np.dot(dr, w[1] * lnD)])
  return float(np.sum(huber(r, delta))) / delta, grad


def _grid_thetas(grid):
  axes = [np.asarray(grid[k], np.float64).reshape(-1) for k in THETA]
  return np.array(list(itertools.product(*axes)), np.float64)


def _chinchilla_logs(N, D, L):
  """Validated logs of (N, D, L), or ValueError naming what the data lack."""
  N, D, L = _positive("N (parameters)", N), _positive("D (tokens)", D), _positive("L (loss)", L)
  _same_length(N=N, D=D, L=L)
  n_sizes, n_data = np.unique(N).size, np.unique(D).size
  if n_sizes < 2 or n_data < 2 or N.size < MIN_CHINCHILLA_POINTS:
    raise ValueError(f"a Chinchilla fit needs >= 2 distinct N, >= 2 distinct D and >= "
                     f"{MIN_CHINCHILLA_POINTS} points (5 parameters); got {n_sizes} N, "
                     f"{n_data} D, {N.size} points")
  return np.log(N), np.log(D), np.log(L)


def _fit_dict(theta, loss, n):
  a, b, e, alpha, beta = (float(v) for v in theta)
  total = alpha + beta
  return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
          "alpha": alpha, "beta": beta,
          "a": beta / total if total > 0 else None, "b": alpha / total if total > 0 else None,
          "loss": float(loss), "n": int(n), "theta": [a, b, e, alpha, beta]}


def _minimise(lnN, lnD, lnL, delta, starts):
  best_theta, best = None, np.inf
  for x0 in starts:
    res = optimize.minimize(_objective, x0, args=(lnN, lnD, lnL, delta), jac=True,
                            method="L-BFGS-B", bounds=_BOUNDS,
                            options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-8})
    if np.isfinite(res.fun) and res.fun < best:
      best_theta, best = res.x, float(res.fun)
  return best_theta, best * delta


def fit_chinchilla(N, D, L, *, delta=1e-3, grid=None, n_starts=16, starts=()):
  """Hoffmann et al.'s approach 3: L(N, D) = E + A / N^alpha + B / D^beta (see module doc).

  N: [n] parameters, D: [n] training tokens, L: [n] final losses (all > 0; >= 2 distinct N,
  >= 2 distinct D, >= 6 points). grid: {"alpha", "beta", "e", "a", "b": values} of starting
  points (default PAPER_GRID, 4500 points). The objective is evaluated at every grid point and
  L-BFGS-B runs from the `n_starts` best of them (None: from all of them, the paper's exact
  procedure, ~100x slower), plus from any explicit `starts` ([5] vectors in THETA order).
  Returns dict(E, A, B, alpha, beta, a, b, loss, n, theta): a = beta / (alpha + beta) and
  b = alpha / (alpha + beta) are the compute-optimal exponents (N_opt ~ C^a, D_opt ~ C^b), loss
  the summed Huber loss at the optimum, theta = [log A, log B, log E, alpha, beta].
  """
  lnN, lnD, lnL = _chinchilla_logs(N, D, L)
  thetas = np.asarray(list(starts), np.float64).reshape(-1, 5)
  if n_starts is None or n_starts > 0:
    cands = _grid_thetas(PAPER_GRID if grid is None else grid)
    scores = np.sum(huber(chinchilla_log_predict(cands, lnN, lnD) - lnL, delta), axis=-1)
    order = np.argsort(scores, kind="stable")
    thetas = np.concatenate([thetas, cands[order if n_starts is None else order[:n_starts]]])
  if not len(thetas):
    raise ValueError("fit_chinchilla needs starting points: n_starts > 0 or explicit starts")
  theta, loss = _minimise(lnN, lnD, lnL, delta, thetas)
  return _fit_dict(theta, loss, lnN.size)


def _random_starts(rng, count, grid):
  """`count` starts drawn uniformly from the box the grid spans."""
  lo = np.array([np.min(grid[k]) for k in THETA])
  hi = np.array([np.max(grid[k]) for k in THETA])
  return lo + (hi - lo) * rng.random((count, 5))


def bootstrap_chinchilla(N, D, L, *, n_boot=200, seed=0, ci=0.95, delta=1e-3, grid=None,
                         n_starts=16, n_random_starts=3):
  """fit_chinchilla with percentile CIs from resampling the points with replacement.

  The full-data fit uses the screened grid (see fit_chinchilla). Each bootstrap refit starts
  from the full-data optimum plus `n_random_starts` points drawn uniformly from the grid's box
  (a full grid per refit would be ~20x slower; the optimum of a resample is near the full
  one). Resamples with < 2 distinct N or D, or fewer distinct points than 6, are skipped.
  Returns dict(fit, ci={E, A, B, alpha, beta, a, b: [lo, hi]}, n_boot, n_used, n_skipped, level).
  """
  lnN, lnD, lnL = _chinchilla_logs(N, D, L)
  fit = fit_chinchilla(N, D, L, delta=delta, grid=grid, n_starts=n_starts)
  rng = np.random.default_rng(seed)
  box = PAPER_GRID if grid is None else grid
  keys = ("E", "A", "B", "alpha", "beta", "a", "b")
  draws = {k: [] for k in keys}
  skipped = 0
  for _ in range(n_boot):
    idx = rng.integers(lnN.size, size=lnN.size)
    rows = np.unique(np.stack([lnN[idx], lnD[idx], lnL[idx]]), axis=1)
    if (np.unique(lnN[idx]).size < 2 or np.unique(lnD[idx]).size < 2
        or rows.shape[1] < MIN_CHINCHILLA_POINTS):
      skipped += 1
      continue
    starts = np.concatenate([[fit["theta"]], _random_starts(rng, n_random_starts, box)])
    theta, loss = _minimise(lnN[idx], lnD[idx], lnL[idx], delta, starts)
    refit = _fit_dict(theta, loss, idx.size)
    for k in keys:
      draws[k].append(np.nan if refit[k] is None else refit[k])
  return {"fit": fit, "ci": {k: _interval(draws[k], ci) for k in keys}, "n_boot": int(n_boot),
          "n_used": int(n_boot - skipped), "n_skipped": int(skipped), "level": ci}


def compute_optimal(fit, C):
  """(N_opt, D_opt) minimising fit's L(N, D) subject to 6 N D = C (Hoffmann et al. eq. 4).

  fit: a dict with A, B, alpha, beta (fit_chinchilla's); C: FLOPs, scalar or array.
  """
  alpha, beta, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
  if not (alpha > 0 and beta > 0):
    raise ValueError(f"compute-optimal sizes need alpha > 0 and beta > 0; got alpha={alpha:.3g}, "
                     f"beta={beta:.3g} (a term that does not fall with scale)")
  C = _positive("C (compute)", C) if np.ndim(C) else float(_positive("C (compute)", C)[0])
  g = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
  a, b = beta / (alpha + beta), alpha / (alpha + beta)
  return g * (C / 6.0) ** a, (C / 6.0) ** b / g


# ------------------------------------------------------------------------------- isoFLOPs


def _budget_groups(C, rtol):
  """[index array] of points whose C agree within rtol (chained from the smallest of a group)."""
  order = np.argsort(C, kind="stable")
  groups = []
  for i in order:
    if groups and C[i] <= C[groups[-1][0]] * (1.0 + rtol):
      groups[-1].append(i)
    else:
      groups.append([i])
  return [np.array(g) for g in groups]


def isoflop_minima(points, *, rtol=0.01):
  """Loss-optimal model size per compute budget (Hoffmann et al.'s approach 2).

  points: [(C, N, L)]: compute, parameters, loss per run (all > 0). Runs whose C agree within
  relative `rtol` form one budget (C = their geometric mean). Per budget with >= 3 distinct N,
  a least-squares parabola L = c2 x^2 + c1 x + c0 in x = log N gives N* = exp(-c1 / (2 c2)),
  D* = C / (6 N*), L* at the vertex; `outside_range` flags a vertex beyond the sampled sizes
  (an extrapolation of the parabola). Budgets with fewer sizes or a parabola that opens
  downward are listed in `skipped` with the reason.
  Returns dict(minima=[dict(C, N_opt, D_opt, L_opt, outside_range, coef, N, L)],
  skipped=[dict(C, N, L, reason)], rtol).
  """
  p = np.asarray(points, np.float64)
  if p.ndim != 2 or p.shape[1] != 3:
    raise ValueError(f"points must be a sequence of (C, N, L) triples; got shape {p.shape}")
  C, N = _positive("C (compute)", p[:, 0]), _positive("N (parameters)", p[:, 1])
  L = p[:, 2]
  if not np.all(np.isfinite(L)):
    raise ValueError("L (loss) must be finite")
  minima, skipped = [], []
  for g in _budget_groups(C, rtol):
    order = g[np.argsort(N[g], kind="stable")]
    c = float(np.exp(np.mean(np.log(C[order]))))
    info = {"C": c, "N": N[order].tolist(), "L": L[order].tolist()}
    x = np.log(N[order])
    sizes = np.unique(x).size
    if sizes < 3:
      skipped.append(dict(info, reason=f"{sizes} distinct model size(s) at this budget; a "
                          "parabola needs >= 3"))
      continue
    coef = np.polyfit(x, L[order], 2)
    if not coef[0] > 0:
      skipped.append(dict(info, reason="L vs log N opens downward at this budget (no minimum); "
                          "the sizes may all lie on one side of the optimum"))
      continue
    x_opt = -coef[1] / (2.0 * coef[0])
    n_opt = float(np.exp(x_opt))
    minima.append(dict(info, N_opt=n_opt, D_opt=c / (6.0 * n_opt),
                       L_opt=float(np.polyval(coef, x_opt)),
                       outside_range=bool(x_opt < x.min() or x_opt > x.max()),
                       coef=coef.tolist()))
  return {"minima": minima, "skipped": skipped, "rtol": rtol}


def fit_power_law(C, X):
  """X = coefficient * C^exponent by least squares in log-log space (e.g. N* or D* vs C).

  Returns dict(exponent, coefficient, r2, n); >= 2 distinct C needed.
  """
  fit = trendline(C, X)
  return {"exponent": fit["slope"], "coefficient": float(np.exp(fit["intercept"])),
          "r2": fit["r2"], "n": fit["n"]}
