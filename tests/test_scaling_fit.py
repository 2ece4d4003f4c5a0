"""Scaling fits on synthetic runs drawn from known laws: the fits recover what generated them."""

import json
import os

import numpy as np
import pytest

from tfusion.scaling import cli
from tfusion.scaling import fit as fit_lib

# Hoffmann et al.'s fitted law (their eq. 10), the truth the Chinchilla tests draw from.
TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(N, D, t=TRUTH):
  return t["E"] + t["A"] / np.asarray(N) ** t["alpha"] + t["B"] / np.asarray(D) ** t["beta"]


def power_points(rng, slope, intercept, flops, noise):
  """[(C, y)] with log y = intercept + slope log C + N(0, noise)."""
  ly = intercept + slope * np.log(flops) + rng.normal(0.0, noise, len(flops))
  return np.stack([flops, np.exp(ly)], axis=1)


FLOPS = np.geomspace(1e18, 1e22, 8)


# ---------------------------------------------------------------------------- trendlines


def test_trendline_recovers_slope_and_its_ci_covers_truth_in_most_seeds():
  covered, errors = 0, []
  for seed in range(20):
    rng = np.random.default_rng(seed)
    pts = power_points(rng, -0.05, 2.0, FLOPS, noise=0.01)
    res = fit_lib.bootstrap_trend(pts, n_boot=300, seed=seed)
    errors.append(res["fit"]["slope"] + 0.05)
    lo, hi = res["slope_ci"]
    covered += lo <= -0.05 <= hi
  assert np.max(np.abs(errors)) < 0.01, errors
  # Percentile intervals of 8 points are a little narrow: most, not 95%, of 20 seeds.
  assert covered >= 14, covered


def test_parity_ratio_matches_the_generating_lines_and_lies_in_its_ci():
  # Same slope, family a's line lower by log(1.6): the truth from inverting both lines.
  slope, ia, ib = -0.06, 2.0 - np.log(1.6), 2.0
  target = float(np.exp(ib + slope * np.log(1e21)))  # b's value at 1e21
  true_ratio = float(np.exp((np.log(target) - ia) / slope - (np.log(target) - ib) / slope))
  assert true_ratio < 1  # a is the better family: it needs less compute
  hits = 0
  for seed in range(10):
    rng = np.random.default_rng(100 + seed)
    res = fit_lib.bootstrap_trend_and_parity(
        power_points(rng, slope, ia, FLOPS, 0.01), power_points(rng, slope, ib, FLOPS, 0.01),
        target, n_boot=300, seed=seed, names=("tf", "baseline"))
    p = res["parity"]
    assert abs(np.log(p["ratio"] / true_ratio)) < 0.5, (p["ratio"], true_ratio)
    lo, hi = p["ci"]
    assert lo < p["ratio"] < hi
    hits += lo <= true_ratio <= hi
    assert p["n_used"] + p["n_skipped_degenerate"] + p["n_skipped_undefined"] == 300
  assert hits >= 7, hits
  # Swapping the families inverts the ratio.
  swapped = fit_lib.parity_ratio(res["b"]["fit"], res["a"]["fit"], target)
  assert swapped["ratio"] == pytest.approx(1.0 / p["ratio"], rel=1e-9)


def test_parity_for_higher_is_better_metrics():
  a = fit_lib.trendline([1e18, 1e20], [0.2, 0.4])  # accuracy doubling over 100x compute
  b = fit_lib.trendline([1e18, 1e20], [0.1, 0.2])
  p = fit_lib.parity_ratio(a, b, 0.2, higher_is_better=True)
  assert p["ratio"] == pytest.approx(0.01, rel=1e-9)  # a has 0.2 at 1e18, b at 1e20
  worse = fit_lib.trendline([1e18, 1e20], [0.3, 0.2])  # accuracy falls with compute
  with pytest.raises(ValueError, match="of b does not increase with compute"):
    fit_lib.parity_ratio(a, worse, 0.2, higher_is_better=True)


def test_degenerate_trend_inputs_say_what_is_wrong():
  with pytest.raises(ValueError, match="2 distinct x"):
    fit_lib.trendline([1e20, 1e20, 1e20], [3.0, 2.9, 2.8])
  with pytest.raises(ValueError, match="finite and > 0"):
    fit_lib.trendline([1e20, 1e21], [3.0, float("nan")])
  flat = fit_lib.trendline([1e18, 1e19, 1e20], [2.0, 2.1, 2.2])  # loss grows with compute
  good = fit_lib.trendline([1e18, 1e19, 1e20], [3.0, 2.5, 2.0])
  with pytest.raises(ValueError, match="does not decrease with compute"):
    fit_lib.parity_ratio(flat, good, 2.5, names=("grows", "ok"))


# ------------------------------------------------------------------------ Chinchilla law


def chinchilla_grid(rng, noise):
  N = np.geomspace(1e7, 3e9, 6)
  D = np.geomspace(1e9, 3e11, 5)
  NN, DD = [v.ravel() for v in np.meshgrid(N, D)]
  L = chinchilla_loss(NN, DD) * np.exp(rng.normal(0.0, noise, NN.size))
  return NN, DD, L


def test_chinchilla_fit_recovers_the_law():
  N, D, L = chinchilla_grid(np.random.default_rng(0), noise=0.002)
  fit = fit_lib.fit_chinchilla(N, D, L)
  assert fit["E"] == pytest.approx(TRUTH["E"], rel=0.05)
  assert fit["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.04)
  assert fit["beta"] == pytest.approx(TRUTH["beta"], abs=0.04)
  a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
  assert fit["a"] == pytest.approx(a_true, abs=0.04)
  assert fit["a"] + fit["b"] == pytest.approx(1.0)
  # Compute-optimal sizes from the fit lie near the true law's.
  n_true, d_true = fit_lib.compute_optimal(TRUTH, 1e23)
  n_fit, d_fit = fit_lib.compute_optimal(fit, 1e23)
  assert 6 * n_fit * d_fit == pytest.approx(1e23, rel=1e-9)
  assert abs(np.log(n_fit / n_true)) < np.log(2.0)


def test_compute_optimal_is_the_constrained_minimum():
  C = 1e21
  n_opt, d_opt = fit_lib.compute_optimal(TRUTH, C)
  ns = np.geomspace(n_opt / 4, n_opt * 4, 401)
  losses = chinchilla_loss(ns, C / (6 * ns))
  assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.01)


def test_chinchilla_bootstrap_ci_covers_truth_in_most_seeds():
  covered = 0
  for seed in range(3):
    N, D, L = chinchilla_grid(np.random.default_rng(10 + seed), noise=0.003)
    res = fit_lib.bootstrap_chinchilla(N, D, L, n_boot=30, seed=seed, n_random_starts=1)
    assert res["n_used"] + res["n_skipped"] == 30
    lo, hi = res["ci"]["alpha"]
    blo, bhi = res["ci"]["beta"]
    covered += (lo <= TRUTH["alpha"] <= hi) + (blo <= TRUTH["beta"] <= bhi)
  assert covered >= 4, covered  # of 6 intervals


def test_degenerate_chinchilla_inputs_say_what_is_needed():
  N = np.array([1e8] * 6)
  D = np.geomspace(1e9, 1e11, 6)
  with pytest.raises(ValueError, match=r">= 2 distinct N.*got 1 N, 6 D, 6 points"):
    fit_lib.fit_chinchilla(N, D, chinchilla_loss(N, D))
  with pytest.raises(ValueError, match="same length"):
    fit_lib.fit_chinchilla([1e8, 1e9], [1e9, 1e10, 1e11], [3.0, 2.0])


# -------------------------------------------------------------------------------- isoFLOPs


def test_isoflop_minima_follow_the_laws_compute_optimal_exponent():
  points = []
  budgets = np.geomspace(1e19, 1e23, 5)
  for C in budgets:
    n_opt, _ = fit_lib.compute_optimal(TRUTH, C)
    for N in n_opt * np.geomspace(0.1, 10.0, 9):
      points.append((C, N, float(chinchilla_loss(N, C / (6 * N)))))
  iso = fit_lib.isoflop_minima(points)
  assert len(iso["minima"]) == 5 and not iso["skipped"]
  for m, C in zip(iso["minima"], budgets):
    n_true, _ = fit_lib.compute_optimal(TRUTH, C)
    assert abs(np.log(m["N_opt"] / n_true)) < np.log(1.5)
    assert not m["outside_range"]
  law = fit_lib.fit_power_law([m["C"] for m in iso["minima"]],
                              [m["N_opt"] for m in iso["minima"]])
  a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
  assert law["exponent"] == pytest.approx(a_true, abs=0.03)


def test_isoflop_budgets_with_too_few_sizes_are_skipped_with_a_reason():
  iso = fit_lib.isoflop_minima([(1e20, 1e8, 3.0), (1e20, 1e9, 2.9), (1e21, 1e8, 2.8)])
  assert not iso["minima"]
  assert [s["reason"].split(" ")[0] for s in iso["skipped"]] == ["2", "1"]


# ------------------------------------------------------------------------------------ CLI


def synthetic_sweep(path, rng, *, ratio_shift=np.log(1.5), missing_metric=False):
  """runs.jsonl of two families x 4 sizes x 2 budgets from the Chinchilla law; the causal
  family's loss is the law evaluated at 1/1.5 of its tokens (it learns as if from fewer)."""
  rows = []
  for family, shrink in (("bidirectional", 1.0), ("causal_image", np.exp(ratio_shift))):
    for size, N in zip("abcd", np.geomspace(1e7, 1e9, 4)):
      for budget, D in (("1x", 2e9), ("4x", 8e9)):
        loss = float(chinchilla_loss(N, D / shrink) * np.exp(rng.normal(0, 0.002)))
        rows.append({"run": f"{family}-{size}-{budget}", "family": family, "size": size,
                     "budget": budget, "params": N * 1.1, "params_nonembed": N, "step": 100,
                     "final": True, "tokens": D, "text_tokens": D / 2, "image_patches": D / 2,
                     "flops_6nd": 6 * N * D, "flops": 7 * N * D,
                     "metrics": {} if missing_metric else {"loss/image": loss}})
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "runs.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def test_cli_fits_a_synthetic_sweep_and_writes_json_and_plots(tmp_path, capsys):
  synthetic_sweep(str(tmp_path), np.random.default_rng(0))
  out = tmp_path / "out"
  assert cli.main(["fit", str(tmp_path), "--out", str(out), "--n-boot", "200",
                   "--chinchilla-boot", "20"]) == 0
  printed = capsys.readouterr().out
  assert "parity: bidirectional reaches" in printed
  result = json.loads((out / "fit.json").read_text())
  assert set(result["trend"]["families"]) == {"bidirectional", "causal_image"}
  parity = result["trend"]["parity"]
  assert parity["families"] == ["bidirectional", "causal_image"]
  assert parity["ratio"] < 1.0  # the bidirectional family needs less compute
  lo, hi = parity["ci"]
  assert lo <= parity["ratio"] <= hi
  chin = result["chinchilla"]["bidirectional"]
  assert chin["fit"]["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.1)
  assert len(chin["residuals"]) == 8
  for name in ("trend.png", "residuals.png"):
    assert (out / name).stat().st_size > 5000
  # Token budgets are not isoFLOP budgets: said, not faked.
  assert result["isoflop"]["bidirectional"]["minima"] == []
  assert "isoflop bidirectional: no budget with >= 3 model sizes" in printed


@pytest.mark.parametrize("args, message", [
    (["--metric", "fid"], "no run has metric 'fid'; the registry has: loss/image"),
    (["--parity", "bidirectional,chameleon"], "--parity: unknown family chameleon"),
    (["--families", "x"], "--families: no points for x"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
  synthetic_sweep(str(tmp_path), np.random.default_rng(0))
  assert cli.main(["fit", str(tmp_path), "--n-boot", "10", "--chinchilla-boot", "2"] + args) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1


def test_cli_errors_on_a_directory_that_is_not_a_sweep(tmp_path, capsys):
  assert cli.main(["fit", str(tmp_path)]) == 2
  assert "runs.jsonl does not exist: not a sweep directory" in capsys.readouterr().err


def test_cli_one_size_per_family_cannot_be_fitted(tmp_path, capsys):
  rows = synthetic_sweep(str(tmp_path), np.random.default_rng(0))
  with open(tmp_path / "runs.jsonl", "w") as f:
    for r in rows:
      if r["size"] == "a" and r["budget"] == "1x":
        f.write(json.dumps(r) + "\n")
  assert cli.main(["fit", str(tmp_path), "--n-boot", "10"]) == 2
  err = capsys.readouterr().err
  assert "no family could be fitted" in err and "2 distinct x values" in err


def test_cli_partial_sweep_fits_what_it_has_and_names_what_is_missing(tmp_path, capsys):
  rows = synthetic_sweep(str(tmp_path), np.random.default_rng(0))
  rows[0]["metrics"] = {}  # bidirectional-a-1x: evaluated without the loss suite
  rows = [r for r in rows if r["run"] != "causal_image-d-4x"]  # not run yet
  with open(tmp_path / "runs.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  assert cli.main(["fit", str(tmp_path), "--n-boot", "50", "--chinchilla-boot", "5",
                   "--out", str(tmp_path / "o")]) == 0
  printed = capsys.readouterr().out
  assert "missing: bidirectional-a-1x: no 'loss/image' at its final step 100" in printed
  result = json.loads((tmp_path / "o" / "fit.json").read_text())
  assert result["trend"]["families"]["bidirectional"]["fit"]["n"] == 7
  assert result["trend"]["families"]["causal_image"]["fit"]["n"] == 7
  assert result["missing"] == [{"run": "bidirectional-a-1x",
                                "reason": "no 'loss/image' at its final step 100"}]
