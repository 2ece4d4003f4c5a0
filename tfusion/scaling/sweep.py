"""`tfusion-sweep SPEC --dir S [--plan | --run | --print-launch slurm|tpu | --collect | --prepare]`.

Runs a sweep spec (experiments/sweeps/*.py, tfusion/scaling/spec.py) in the sweep directory S:
  --plan          (default) a table of the runs: parameters, tokens, steps, FLOPs, and totals
  --run           trains and evaluates every run here, one after another, in this process; each
                  in S/runs/<name> (tfusion-train's workdir). Resumable: a run whose final
                  checkpoint is evaluated for every suite is skipped, an interrupted one resumes
                  from its newest checkpoint, and the eval job evaluates each checkpoint once.
                  The registry S/runs.jsonl is rebuilt after each run.
  --print-launch  the commands that run the sweep on a cluster: a SLURM job array (one task per
                  run, training through launch/slurm.sbatch, then tfusion-eval --once) or one
                  launch/tpu_pod.sh command per run; with FLOPs per run and the total
  --collect       rebuilds S/runs.jsonl (tfusion/scaling/registry.py) and lists what is missing
  --prepare       only the demo's data (base_config "demo"): S/data and S/vae, and for families
                  with another representation (spec.py: a family's own base) S/<representation>/
                  {data,vae} (e.g. S/discrete: its tokenizer, VQ-VAE and code records)
`--only GLOB,...` restricts any action to the runs whose names match (fnmatch).

S/sweep.json records the spec's name, fingerprint and expanded runs (written by --run, --collect
and --prepare); another spec (a different fingerprint) is refused in one line by every action,
so two grids never mix in one directory.
"""

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import time

from tfusion import flops as flops_lib
from tfusion.scaling import registry
from tfusion.scaling import spec as spec_lib

PROG = "tfusion-sweep"
MFU = 0.4  # assumed model FLOPs utilisation for the GPU-days estimate
GPU = "NVIDIA H100"  # its dense bf16 peak (tfusion/flops.py) for the estimate

_START = time.perf_counter()


class SweepDirError(ValueError):
  """The sweep directory belongs to another spec (one line)."""


def say(message):
  print(f"[sweep {time.perf_counter() - _START:6.0f}s] {message}", flush=True)


# ------------------------------------------------------------------------ sweep directory


def open_sweep_dir(sweep_dir, spec, runs, fingerprint, *, write):
  """Refuses a directory made by another spec; writes S/sweep.json when `write`."""
  existing = registry.read_sweep(sweep_dir)
  if existing is not None and existing.get("fingerprint") != fingerprint:
    raise SweepDirError(
        f"{sweep_dir} was made by spec {existing.get('name')!r} (fingerprint "
        f"{existing.get('fingerprint')}), this is {spec['name']!r} (fingerprint {fingerprint}): "
        "use another --dir")
  if not write:
    return
  os.makedirs(sweep_dir, exist_ok=True)
  record = {"name": spec["name"], "fingerprint": fingerprint, "base_config": spec["base_config"],
            "eval_suites": spec_lib.suites_of(spec),
            "runs": [dataclasses.asdict(r) for r in runs]}
  path = os.path.join(sweep_dir, registry.SWEEP_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, default=str)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------- plan


def human(n):
  """1234567 -> '1.23M' (k, M, B, T)."""
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}" if isinstance(n, float) else str(n)


def gpu_days(total_flops, mfu=MFU):
  return total_flops / (flops_lib.PEAK_BF16_FLOPS[GPU] * mfu * 86400)


def format_plan(runs, mfu=MFU, prefix=""):
  """The runs as a table with totals (lines start with `prefix`, e.g. '# ')."""
  width = max(len("run"), *(len(r.name) for r in runs))
  head = (f"{'run':<{width}} {'params':>8} {'nonemb':>8} {'tokens':>8} {'steps':>8} "
          f"{'warmup':>7} {'flops_6nd':>10} {'flops':>10}")
  lines = [head, "-" * len(head)]
  for r in runs:
    lines.append(f"{r.name:<{width}} {human(r.params):>8} {human(r.params_nonembed):>8} "
                 f"{human(r.tokens):>8} {r.steps:>8} {r.overrides['optim.warmup_steps']:>7} "
                 f"{r.flops_6nd:>10.3g} {r.flops:>10.3g}")
  total_6nd = sum(r.flops_6nd for r in runs)
  total = sum(r.flops for r in runs)
  lines.append("-" * len(head))
  lines.append(f"{f'total ({len(runs)} runs)':<{width}} {'':>8} {'':>8} "
               f"{human(sum(r.tokens for r in runs)):>8} {sum(r.steps for r in runs):>8} "
               f"{'':>7} {total_6nd:>10.3g} {total:>10.3g}")
  lines.append(f"total compute {total:.3g} FLOPs (attention counted densely) = "
               f"{gpu_days(total, mfu):.3g} {GPU.split()[-1]}-days at {mfu:.0%} MFU "
               f"(assumed; {flops_lib.PEAK_BF16_FLOPS[GPU] / 1e12:.0f} TFLOP/s dense bf16 peak)")
  return "\n".join(prefix + line for line in lines)


# --------------------------------------------------------------------------------- launch


def demo_root(sweep_dir, representation=None):
  """Where the demo's data for a representation lives: the sweep directory itself (S/data,
  S/vae) for the default (None) and continuous, S/<representation> for the others."""
  if representation in (None, "continuous"):
    return sweep_dir
  return os.path.join(sweep_dir, representation)


def data_overrides(spec, sweep_dir, base, representation=None):
  """Path keys the runner adds to the runs of one base: for base_config "demo", the demo's data
  and VAE in demo_root(sweep_dir, representation) (tfusion/demo/main.py configure_run); else
  none."""
  if spec["base_config"] != spec_lib.DEMO:
    return {}
  from tfusion import configlib
  from tfusion.demo import main as demo_main
  configured = demo_main.configure_run(copy.deepcopy(base),
                                       demo_main.paths(demo_root(sweep_dir, representation)))
  out = {}
  for key in configlib.PATH_KEYS:
    before, after = _get(base, key), _get(configured, key)
    if after != before:
      out[key] = after
  return out


def family_data_overrides(spec, sweep_dir, bases):
  """{family: data_overrides} for bases = spec_lib.family_bases(spec): each family's paths
  point at its own base's prepared root."""
  return {family: data_overrides(spec, sweep_dir, base, spec_lib.own_base(spec, family))
          for family, base in bases.items()}


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _flag_value(value):
  if isinstance(value, (list, tuple)):
    return str(tuple(value))
  return str(value)


def train_args(spec, run, sweep_dir, extra):
  """tfusion-train's arguments for one run (--config first: ml_collections wants it so). A
  demo family with its own representation gets tfusion/scaling/demo_base.py:<representation>
  (the demo config takes no such arg from --config)."""
  path, arg = spec_lib.base_config_path(spec)
  rep = spec_lib.own_base(spec, run.family)
  if rep is not None:
    from tfusion.scaling import demo_base
    path, arg = demo_base.__file__, rep
  if os.path.isabs(path) and path.startswith(spec_lib.repo_root() + os.sep):
    path = os.path.relpath(path, spec_lib.repo_root())  # launchers run from the repo root
  args = ["--config", f"{path}:{arg}" if arg else path,
          "--workdir", registry.run_dir(sweep_dir, run.name)]
  for key, value in sorted({**run.overrides, **extra}.items()):
    args.append(f"--config.{key}={_flag_value(value)}")
  return args


def _quoted(args):
  return " ".join(shlex.quote(a) for a in args)


def _extra(extra, run):
  """extra is {dotted key: value} for every run, or {family: {dotted key: value}}."""
  if run.family in extra and isinstance(extra[run.family], dict):
    return extra[run.family]
  return extra


def format_slurm(spec, runs, sweep_dir, fingerprint, extra, mfu=MFU):
  """A SLURM job-array script: array task i trains run i, then evaluates it."""
  suites = ",".join(spec_lib.suites_of(spec))
  lines = [
      "#!/usr/bin/env bash",
      f"# Sweep {spec['name']} (fingerprint {fingerprint}): {len(runs)} runs, one array task "
      "each.",
      "# Save as sweep.sbatch and submit from the repository root (N nodes per run):",
      "#   sbatch --nodes=N sweep.sbatch",
      "# Each task trains through launch/slurm.sbatch (a preempted task is requeued and resumes",
      "# from its checkpoint), then evaluates the run's kept checkpoints once (tfusion-eval).",
      "#",
      format_plan(runs, mfu, prefix="# "),
      f"#SBATCH --job-name=tfusion-sweep-{spec['name']}",
      f"#SBATCH --array=0-{len(runs) - 1}",
      "#SBATCH --ntasks-per-node=1",
      "#SBATCH --gpus-per-node=8",
      "#SBATCH --cpus-per-task=32",
      "#SBATCH --signal=TERM@120",
      "#SBATCH --requeue",
      "#SBATCH --output=tfusion-sweep-%A_%a.out",
      "set -euo pipefail",
      'case "${SLURM_ARRAY_TASK_ID}" in',
  ]
  for i, run in enumerate(runs):
    workdir = registry.run_dir(sweep_dir, run.name)
    lines += [f"  {i})  # {run.name}: {human(run.params)} params, {human(run.tokens)} tokens, "
              f"{run.flops:.3g} FLOPs",
              f"    W={shlex.quote(workdir)}; STEPS={run.steps}",
              f"    TRAIN=({_quoted(train_args(spec, run, sweep_dir, _extra(extra, run)))}) ;;"]
  lines += [
      '  *) echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;',
      "esac",
      'bash launch/slurm.sbatch "${TRAIN[@]}"',
      "# slurm.sbatch exits 0 after requeueing a preempted task: evaluate finished runs only.",
      '[[ -d "$W/checkpoints/$STEPS" ]] || exit 0',
  ]
  if suites:
    lines.append(f'tfusion-eval --workdir "$W" --once --suites {shlex.quote(suites)}')
  return "\n".join(lines)


def format_tpu(spec, runs, sweep_dir, fingerprint, extra, mfu=MFU):
  """One launch/tpu_pod.sh command per run, then the eval commands."""
  suites = ",".join(spec_lib.suites_of(spec))
  lines = [
      "#!/usr/bin/env bash",
      f"# Sweep {spec['name']} (fingerprint {fingerprint}): {len(runs)} runs on one Cloud TPU "
      "pod slice, one after another",
      "# (rerunning resumes each from its checkpoint). Set TPU and ZONE; run from the repo root.",
      "#",
      format_plan(runs, mfu, prefix="# "),
      "set -euo pipefail",
      'TPU="${TPU:?set TPU}" ZONE="${ZONE:?set ZONE}"',
  ]
  for run in runs:
    lines += [f"# {run.name}: {human(run.params)} params, {human(run.tokens)} tokens, "
              f"{run.flops:.3g} FLOPs",
              'launch/tpu_pod.sh --tpu "$TPU" --zone "$ZONE" -- '
              + _quoted(train_args(spec, run, sweep_dir, _extra(extra, run)))]
  if suites:
    lines.append("# Evaluation, on a machine that sees the workdirs (one host is enough):")
    for run in runs:
      lines.append(f"tfusion-eval --workdir {shlex.quote(registry.run_dir(sweep_dir, run.name))}"
                   f" --once --suites {shlex.quote(suites)}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------- local


def prepare_demo(spec, bases, sweep_dir, log=say):
  """The demo's tokenizer, VAE (a VQ-VAE for discrete) and records of each distinct base of
  bases = spec_lib.family_bases(spec) in its demo_root: S/data and S/vae for the continuous
  families, S/<representation>/{data,vae} for the others (each stage kept when done; a root
  holding another representation's data is refused, demo_main.check_representation)."""
  from tfusion.demo import main as demo_main
  demo_main.check_writable(sweep_dir)
  roots = {}
  for family, base in bases.items():
    roots.setdefault(demo_root(sweep_dir, spec_lib.own_base(spec, family)), base)
  for root, base in roots.items():
    config = spec_lib.apply_overrides(copy.deepcopy(base),
                                      spec_lib.flatten(spec.get("base_overrides")))
    p = demo_main.paths(root)
    demo_main.check_representation(config, root, p)
    log(f"preparing the demo's data in {p['data']} and {p['vae']}")
    demo_main.stage_tokenizer(config, p)
    demo_main.stage_vae(config, p)
    demo_main.stage_records(config, p)


def is_done(workdir, steps, suites):
  """The run's final checkpoint is evaluated for every suite (trained, without suites)."""
  if not os.path.isdir(workdir):
    return False
  if not suites:
    return steps in registry.checkpoint_steps(workdir)
  from tfusion.evaluate import job
  return set(suites) <= job.load_done(workdir).get(steps, set())


def run_local(spec, runs, sweep_dir, *, log=say):
  """Trains and evaluates `runs` here, one after another. Returns {"skipped", "trained",
  "evaluated", "stopped"}: run names (stopped: the run a Ctrl-C or SIGTERM ended, or None)."""
  from tfusion import configlib, train
  from tfusion.evaluate import job
  bases = spec_lib.family_bases(spec)
  suites = spec_lib.suites_of(spec)
  if spec["base_config"] == spec_lib.DEMO:
    from tfusion.demo import suites as demo_suites
    demo_suites.register()
    prepare_demo(spec, {r.family: bases[r.family] for r in runs}, sweep_dir, log=log)
  extras = family_data_overrides(spec, sweep_dir, bases)
  out = {"skipped": [], "trained": [], "evaluated": [], "stopped": None}
  for i, run in enumerate(runs):
    workdir = registry.run_dir(sweep_dir, run.name)
    where = f"[{i + 1}/{len(runs)}] {run.name}"
    if is_done(workdir, run.steps, suites):
      log(f"{where}: done (final step {run.steps} evaluated), skipped")
      out["skipped"].append(run.name)
      continue
    config = spec_lib.apply_overrides(spec_lib.run_config(bases[run.family], run),
                                      extras[run.family])
    config = configlib.absolute_paths(config)
    start = time.perf_counter()
    if run.steps not in registry.checkpoint_steps(workdir):
      log(f"{where}: training {run.steps} steps ({human(run.params)} params, "
          f"{human(run.tokens)} tokens, {run.flops:.3g} FLOPs) in {workdir}")
      result = train.train_and_evaluate(config, workdir)
      if result["step"] < run.steps:
        log(f"{where}: {result['stop_reason']} at step {result['step']}; rerun to resume")
        out["stopped"] = run.name
        break
      out["trained"].append(run.name)
      del result  # the train state
    trained = time.perf_counter()
    if suites:
      job.run(workdir, suites, config=config, once=True, log=log)
      out["evaluated"].append(run.name)
    _, missing = registry.collect(sweep_dir)
    log(f"{where}: trained {trained - start:.0f}s, evaluated {time.perf_counter() - trained:.0f}s;"
        f" {len(runs) - i - 1} runs left here, {len(missing)} runs of the sweep not done")
  return out


# ------------------------------------------------------------------------------------ CLI


def _parser():
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("spec", help="sweep spec file (experiments/sweeps/*.py)")
  parser.add_argument("--dir", help="the sweep directory S (runs in S/runs/<name>)")
  action = parser.add_mutually_exclusive_group()
  action.add_argument("--plan", action="store_true", help="print the runs (the default)")
  action.add_argument("--run", action="store_true", help="train and evaluate here, resumably")
  action.add_argument("--print-launch", choices=("slurm", "tpu"),
                      help="print the cluster commands for the runs")
  action.add_argument("--collect", action="store_true", help="rebuild S/runs.jsonl")
  action.add_argument("--prepare", action="store_true",
                      help="prepare the demo's data only (base_config 'demo')")
  parser.add_argument("--only", default=None,
                      help="comma-separated globs over run names (default: the spec's `only`)")
  parser.add_argument("--mfu", type=float, default=MFU,
                      help="assumed MFU for the GPU-days estimate")
  return parser


def _error(message):
  for line in str(message).splitlines():
    print(f"{PROG}: error: {line}", file=sys.stderr)
  return 2


def main(argv=None):
  """The CLI. Returns the exit status (0 ok, 1 a local run stopped early, 2 an error)."""
  args = _parser().parse_args(argv)
  try:
    spec = spec_lib.load(args.spec)
    runs = spec_lib.expand(spec)
    fingerprint = spec_lib.fingerprint(spec, runs)
    selected = spec_lib.select(runs, args.only if args.only is not None else spec.get("only"))
    if not selected:
      raise spec_lib.SweepSpecError(f"--only {args.only or spec.get('only')!r} matches none of "
                                    f"the runs ({', '.join(r.name for r in runs[:4])}, ...)")
    if (args.run or args.print_launch or args.collect or args.prepare) and not args.dir:
      raise spec_lib.SweepSpecError("--dir is required (the sweep directory)")
    if args.dir:  # --plan and --print-launch only check: S may be a path on the cluster
      open_sweep_dir(args.dir, spec, runs, fingerprint,
                     write=bool(args.run or args.collect or args.prepare))
  except (spec_lib.SweepSpecError, SweepDirError) as e:
    return _error(e)

  if args.print_launch:
    extra = family_data_overrides(spec, args.dir, spec_lib.family_bases(spec))
    fmt = format_slurm if args.print_launch == "slurm" else format_tpu
    print(fmt(spec, selected, args.dir, fingerprint, extra, args.mfu))
    return 0
  if args.prepare:
    if spec["base_config"] != spec_lib.DEMO:
      print(f"{PROG}: nothing to prepare: base_config {spec['base_config']!r} brings its own data")
      return 0
    bases = spec_lib.family_bases(spec)
    prepare_demo(spec, {r.family: bases[r.family] for r in selected}, args.dir)
    return 0
  if args.collect:
    rows, missing = registry.collect(args.dir)
    print(f"{len(rows)} rows -> {os.path.join(args.dir, registry.RUNS_FILE)}")
    for name, reason in missing:
      print(f"missing: {name}: {reason}")
    return 0
  if args.run:
    from tfusion import logs
    logs.setup_console()  # the jobs' warnings on screen (training also logs to W/logs/)
    say(f"sweep {spec['name']} (fingerprint {fingerprint}): {len(selected)} of {len(runs)} runs "
        f"in {args.dir}")
    result = run_local(spec, selected, args.dir)
    rows, missing = registry.collect(args.dir)
    say(f"registry: {len(rows)} rows -> {os.path.join(args.dir, registry.RUNS_FILE)}; "
        f"trained {len(result['trained'])}, evaluated {len(result['evaluated'])}, "
        f"skipped {len(result['skipped'])}")
    for name, reason in missing:
      say(f"missing: {name}: {reason}")
    return 1 if result["stopped"] else 0
  print(f"sweep {spec['name']} (fingerprint {fingerprint}): {len(selected)} of {len(runs)} runs; "
        f"eval suites {','.join(spec_lib.suites_of(spec)) or 'none'}")
  print(format_plan(selected, args.mfu))
  return 0


if __name__ == "__main__":
  sys.exit(main())
