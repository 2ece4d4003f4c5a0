"""FID math on Inception-sized features: statistics of two sets of N x 2048 features and the
Frechet distance between them (float64; scipy.linalg.sqrtm, the default, and method="eigh"),
timed separately.

The features are correlated Gaussians (a random mixing matrix) so the covariances are full and
far from diagonal, as real pool3 features are; the second set is shifted. The distance is
checked against the eigenvalue form tr((S1^1/2 S2 S1^1/2)^1/2) computed independently.

Usage: python benchmarks/fid_speed.py [--n 10000] [--dim 2048]
"""

import argparse
import os
import time

import numpy as np

from tfusion.evaluate import fid


def _timed(fn, *args):
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def _eig_trace_form(mu1, s1, mu2, s2):
  w, v = np.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ s2 @ root)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=10000)
  parser.add_argument("--dim", type=int, default=2048)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  mixing = (rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)).astype(np.float32)
  a = rng.standard_normal((args.n, args.dim), dtype=np.float32) @ mixing
  b = rng.standard_normal((args.n, args.dim), dtype=np.float32) @ mixing + 0.05
  print(f"{args.n} x {args.dim} features per set, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}")
  (stats_a, stats_b), t_stats, c_stats = _timed(
      lambda: (fid.feature_statistics(a), fid.feature_statistics(b)))
  value, t_fd, c_fd = _timed(fid.frechet_distance, *stats_a, *stats_b)
  fast, t_eigh, c_eigh = _timed(lambda: fid.frechet_distance(*stats_a, *stats_b, method="eigh"))
  check = _eig_trace_form(*stats_a, *stats_b)
  print(f"statistics (both sets):        {t_stats:6.1f} s wall, {c_stats:6.1f} s CPU")
  print(f"frechet distance, sqrtm:       {t_fd:6.1f} s wall, {c_fd:6.1f} s CPU")
  print(f"frechet distance, eigh:        {t_eigh:6.1f} s wall, {c_eigh:6.1f} s CPU")
  print(f"total with sqrtm (default):    {t_stats + t_fd:6.1f} s wall (target < 60 s)")
  print(f"total with eigh:               {t_stats + t_eigh:6.1f} s wall")
  print(f"FID sqrtm {value:.6f}, eigh {fast:.6f}; independent eigenvalue form {check:.6f}; "
        f"max relative difference {max(abs(value - check), abs(fast - check)) / abs(check):.2e}")


if __name__ == "__main__":
  main()
