"""Plants known defects one at a time and checks that the default test suite catches each.

Usage: python3 benchmarks/mutation_check.py [--only NAME ...] [--list]

Each mutant is a text patch (an exact anchor and its replacement) applied to a fresh copy of
the repository in a temporary directory, so the working tree is never touched and concurrent
edits are harmless. For each mutant the tests that guard it run in that copy
(`python3 -m pytest -q -x -m "not slow" ...`); the mutant is caught when they fail. First the
same selections run on the unmutated copy and must pass. Exit status 1 when a baseline fails,
a mutant survives, or an anchor no longer matches the source (then update the anchor: the
check must follow the code, never silently skip).
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("tfusion", "tests", "experiments", "pytest.ini", "setup.py")


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str  # relative to the repository root
  anchor: str  # must occur exactly once
  replacement: str
  tests: tuple  # pytest arguments: files, -k expressions


MUTANTS = (
    Mutant("1 lambda dropped", "tfusion/losses.py",
           "loss = text_loss + image_weight * image_loss",
           "loss = text_loss + image_loss",
           ("tests/test_losses.py",)),
    Mutant("2 image MSE over all B*M slots", "tfusion/losses.py",
           "image_loss = per_image.sum() / jnp.maximum(image_count, 1.0)",
           "image_loss = per_image.mean()",
           ("tests/test_losses.py",)),
    Mutant("3 noise limiting off (image_max_t ignored)", "tfusion/losses.py",
           't = objective.sample_time(time_rng, batch["image_max_t"].astype(jnp.float32))',
           't = objective.sample_time(time_rng, jnp.ones_like(batch["image_max_t"], jnp.float32))',
           ("tests/test_losses.py",)),
    Mutant("4 model receives t=0", "tfusion/losses.py",
           'batch["image_index"],\n              noisy, t)',
           'batch["image_index"],\n              noisy, jnp.zeros_like(t))',
           ("tests/test_losses.py",)),
    Mutant("5 DDPM reuses the initial noise (step_noise)", "tfusion/generate/image.py",
           "jax.random.fold_in(k, step + 1), shape",
           "jax.random.fold_in(k, 0), shape",
           ("tests/test_generate_samplers.py",)),
    Mutant("6 gradient clipping removed", "tfusion/optim.py",
           "optax.clip_by_global_norm(c.grad_clip) if c.grad_clip > 0 else optax.identity(),",
           "optax.identity(),",
           ("tests/test_optim.py",)),
    Mutant("7a per-epoch shuffle removed", "tfusion/data/pipeline.py",
           "ds = ds.shuffle(seed=_seed(config, index, 0))",
           "ds = ds",
           ("tests/test_data_pipeline.py",)),
    Mutant("7b same order every epoch", "tfusion/data/pipeline.py",
           "ds = ds.repeat(d.num_epochs or None)",
           "ds = ds.repeat(d.num_epochs or None, reseed_each_epoch=False)",
           ("tests/test_data_pipeline.py",)),
    Mutant("8 Generator ignores intra_image", "tfusion/generate/engine.py",
           "self._intra = config.model.intra_image",
           'self._intra = "bidirectional"',
           ("tests/test_generate.py", "-k", "intra_image")),
    Mutant("9 restore picks the oldest checkpoint", "tfusion/checkpoint.py",
           # restore_latest's loop over the steps all processes agreed on
           "for step in reversed(steps):",
           "for step in steps:",
           ("tests/test_resume.py", "-k", "grain")),
)


def copy_repo(dst):
  for name in COPIED:
    src = os.path.join(REPO, name)
    if os.path.isdir(src):
      shutil.copytree(src, os.path.join(dst, name),
                      ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    elif os.path.exists(src):
      shutil.copy2(src, os.path.join(dst, name))


def run_tests(root, tests, timeout):
  """-> (passed, seconds, names of failed tests, the output's tail)."""
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  env.pop("PYTEST_ADDOPTS", None)
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
         *tests]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return False, time.perf_counter() - start, ["(timed out)"], ""
  seconds = time.perf_counter() - start
  failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
  if proc.returncode == 5:
    failed = ["(no tests selected)"]
  return proc.returncode == 0, seconds, failed, (proc.stdout + proc.stderr)[-3000:]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", nargs="*", help="mutant numbers or name parts to run")
  parser.add_argument("--list", action="store_true", help="list the mutants and exit")
  parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
  args = parser.parse_args(argv)
  mutants = [m for m in MUTANTS if not args.only or any(
      m.name.split()[0] == o or o.lower() in m.name.lower() for o in args.only)]
  if args.list:
    for m in mutants:
      print(f"{m.name:48s} {m.path:30s} {' '.join(m.tests)}")
    return 0
  ok = True
  with tempfile.TemporaryDirectory(prefix="tfusion-mutants-") as tmp:
    clean = os.path.join(tmp, "clean")
    os.makedirs(clean)
    copy_repo(clean)
    # The anchors first: a stale one fails the check before any test runs.
    for m in mutants:
      with open(os.path.join(clean, m.path), encoding="utf-8") as f:
        count = f.read().count(m.anchor)
      if count != 1:
        print(f"ANCHOR {m.name}: {m.anchor!r} occurs {count} times in {m.path}; update it")
        ok = False
    if not ok:
      return 1
    print("baseline (unmutated):")
    for tests in dict.fromkeys(m.tests for m in mutants):
      passed, seconds, failed, tail = run_tests(clean, tests, args.timeout)
      print(f"  {'pass' if passed else 'FAIL'} {seconds:6.1f}s  {' '.join(tests)}"
            + ("" if passed else f"  {failed}\n{tail}"), flush=True)
      ok &= passed
    if not ok:
      print("the unmutated tests fail: fix them first")
      return 1
    print("mutants:")
    results = []
    for m in mutants:
      root = os.path.join(tmp, "mutant")
      shutil.rmtree(root, ignore_errors=True)
      os.makedirs(root)
      copy_repo(root)
      target = os.path.join(root, m.path)
      with open(target, encoding="utf-8") as f:
        source = f.read()
      with open(target, "w", encoding="utf-8") as f:
        f.write(source.replace(m.anchor, m.replacement, 1))
      passed, seconds, failed, _ = run_tests(root, m.tests, args.timeout)
      caught = not passed
      results.append((m, caught, seconds, failed))
      print(f"  {'caught' if caught else 'MISSED'} {seconds:6.1f}s  {m.name}"
            + (f"  by {failed[0]}" if caught and failed else ""), flush=True)
      ok &= caught
  survived = [m.name for m, caught, _, _ in results if not caught]
  print(f"{len(results) - len(survived)}/{len(results)} mutants caught"
        + (f"; survived: {survived}" if survived else ""))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
