"""Sweep specs: grids of training runs for scaling curves, as config code (experiments/sweeps/).

A spec file defines `get_sweep()` returning an ml_collections.ConfigDict (built with
`allow_dotted_keys=True`: overrides are keyed by dotted config keys) or a plain dict:
  name            the sweep's name
  base_config     "path.py[:arg]" as --config takes it (relative paths: from the current
                  directory, else the repository root), or "demo": tfusion/demo/config.py, whose
                  data the runner prepares inside the sweep directory (S/data, S/vae)
  base_overrides  {dotted config key: value} shared by every run
  families        {family: {key: value}}   e.g. {"causal_image": {"model.intra_image": "causal"}}
  sizes           {size: {key: value}}     model shapes
  budgets         {budget: {"tokens": T} or {"flops": C}, plus optional {key: value}}
  schedule        how a budget becomes steps, warmup, cosine length and checkpoints
                  (SCHEDULE_DEFAULTS; `schedule_overrides` is the one place this happens)
  eval_suites     comma-separated eval suites for the evaluated checkpoints
  only            optional comma-separated globs over run names (the CLI's --only wins)
  description     optional free text

Runs are families x sizes x budgets, named f"{family}-{size}-{budget}" (in the spec's order for
a plain dict; a ConfigDict iterates its keys sorted); overrides merge in the order
base_overrides, family, size, budget, then the schedule's keys (which nothing else may set).
A token budget T is positions seen, padding included: steps = floor(T / (batch_size *
seq_len)). A FLOPs budget C gives steps = floor(C / train_flops_per_step), with the exact
parameter count of the run's model (jax.eval_shape) and attention counted densely (B * L^2
(query, key) pairs per step; the pairs the mask allows depend on the data, not the config), so
isoFLOP runs of different sizes land within one step's FLOPs of C. `Run.flops` counts the same
way; `Run.flops_6nd` is the paper's compute axis, 6 * N * D with N the parameters without the
token embedding table (as tfusion/flops.py counts them) and D the run's tokens.

A family with its own base (the Chameleon baseline): with base_config "demo", a family (or the
base_overrides) that sets `model.image.representation` gets
`tfusion.demo.config.get_config(representation=...)` as its base, because the demo's
vocabulary, code grid, VQ-VAE and eval settings follow the representation
(`family_base`, `representation_of`). Its runs are validated, expanded and FLOP-counted
against that base, and the runner prepares its data in a root of its own (S/<representation>,
e.g. S/discrete/{data,vae}; tfusion/scaling/sweep.py `demo_root`); continuous families keep
S/data and S/vae. Other base configs are one config for every family: a discrete family there
sets the discrete keys itself (model.image.representation, model.image.codebook_size,
model.vocab_size, model.image.latent_size, vae.path, its records), as any override.
"""

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os

import ml_collections

from tfusion import configlib

DEMO = "demo"  # base_config marker: the demo's config, its data prepared in the sweep dir
REPRESENTATION_KEY = "model.image.representation"  # a demo family's own base follows it

TOP_KEYS = ("name", "description", "base_config", "base_overrides", "families", "sizes",
            "budgets", "schedule", "eval_suites", "only")
REQUIRED = ("name", "base_config", "families", "sizes", "budgets")
BUDGET_KINDS = ("tokens", "flops")

SCHEDULE_DEFAULTS = {
    "warmup_fraction": 0.05,  # warmup = this fraction of the run's steps ...
    "warmup_min": 10,  # ... at least this many (never all of the run) ...
    "warmup_max": 4000,  # ... at most this many (the paper's 4000)
    "evals": 1,  # evenly spaced checkpoints evaluated per run, the final one included
    "checkpoint_every": 0,  # saves for resumption between evaluated ones; 0: only those
}

# Config keys the schedule derives from each budget: an override of one is an error.
DERIVED_KEYS = ("train.steps", "optim.warmup_steps", "optim.decay_steps",
                "checkpoint.every_steps", "checkpoint.keep_period", "checkpoint.keep")


class SweepSpecError(ValueError):
  """A spec that cannot be run; the message is one line per problem."""

  def __init__(self, problems):
    self.problems = [problems] if isinstance(problems, str) else list(problems)
    super().__init__("\n".join(self.problems))


@dataclasses.dataclass
class Run:
  """One run of a sweep, fully derived from the spec."""
  name: str
  family: str
  size: str
  budget: str
  overrides: dict  # every dotted config key this run sets, merged (schedule included)
  steps: int
  tokens: int  # positions seen: steps * batch_size * seq_len
  params: int  # total parameters
  params_nonembed: int  # without the token embedding table
  flops_6nd: float  # 6 * params_nonembed * tokens
  flops: float  # steps * train_flops_per_step, attention counted densely


# ----------------------------------------------------------------------------- loading


def repo_root():
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
  """The spec of a sweep file (`get_sweep()`), as a plain dict."""
  try:
    get_sweep = configlib.load_python_function(path, "get_sweep", what="sweep spec")
  except (FileNotFoundError, ValueError) as e:
    raise SweepSpecError(str(e)) from None
  return as_dict(get_sweep())


def as_dict(spec):
  """A spec (ConfigDict or mapping) as plain nested dicts, FieldReferences resolved."""
  if isinstance(spec, ml_collections.ConfigDict):
    return spec.to_dict()
  return copy.deepcopy(dict(spec))


def base_config_path(spec):
  """(path of the base config file, its arg) with relative paths resolved."""
  base = spec["base_config"]
  if base == DEMO:
    from tfusion.demo import config as demo_config
    return demo_config.__file__, ""
  path, _, arg = base.partition(":")
  if not os.path.isabs(path) and not os.path.exists(path):
    in_repo = os.path.join(repo_root(), path)
    if os.path.exists(in_repo):
      path = in_repo
  return path, arg


def load_base_config(spec, representation=None):
  """The base config (a ConfigDict) the runs' overrides apply to. For base_config "demo",
  `representation` (None: the demo's default) chooses the demo config built for it; other
  bases ignore it (their families set the discrete keys themselves)."""
  if spec["base_config"] == DEMO:
    from tfusion.demo import config as demo_config
    if representation is None:
      return demo_config.get_config()
    try:
      return demo_config.get_config(representation=representation)
    except ValueError as e:
      raise SweepSpecError(f"{REPRESENTATION_KEY}: {e}") from None
  path, arg = base_config_path(spec)
  try:
    return configlib.load_config_file(f"{path}:{arg}" if arg else path)
  except (FileNotFoundError, ValueError) as e:
    raise SweepSpecError(f"base_config {spec['base_config']!r}: {e}") from None


def representation_of(spec, family):
  """The `model.image.representation` a family's runs set (the family's override, else the
  base_overrides'), or None when neither sets it."""
  spec = as_dict(spec)
  for overrides in (spec["families"].get(family), spec.get("base_overrides")):
    value = flatten(overrides).get(REPRESENTATION_KEY)
    if value is not None:
      return value
  return None


def own_base(spec, family):
  """The representation whose demo config is this family's own base, or None when the family
  uses the spec's base (a non-demo base_config, or no representation set)."""
  if as_dict(spec)["base_config"] != DEMO:
    return None
  return representation_of(spec, family)


def family_bases(spec, base=None):
  """{family: base config}: `base` (loaded unless given) for families without their own base;
  for base_config "demo", the demo config built for a family's representation. A bad
  representation is one SweepSpecError naming the families that set it."""
  spec = as_dict(spec)
  if base is None:
    base = load_base_config(spec)
  from tfusion import discrete
  out, built, problems = {}, {}, []
  for family in spec["families"]:
    rep = representation_of(spec, family)
    if rep is not None and rep not in discrete.REPRESENTATIONS:
      problems.append(f"families.{family}: {REPRESENTATION_KEY} must be one of "
                      f"{discrete.REPRESENTATIONS}, got {rep!r}")
      continue
    rep = own_base(spec, family)
    if rep is None:
      out[family] = base
      continue
    if rep not in built:
      try:
        built[rep] = load_base_config(spec, rep)
      except SweepSpecError as e:
        built[rep] = e
    if isinstance(built[rep], SweepSpecError):
      problems.append(f"families.{family}: {built[rep]}")
    else:
      out[family] = built[rep]
  if problems:
    raise SweepSpecError(problems)
  return out


# --------------------------------------------------------------------------- overrides


def model_size(d_model, num_layers, num_heads, mlp_ratio=3):
  """The model keys of one size in a sweep: `num_layers` blocks of width `d_model`, MHA with
  `num_heads` heads of d_model / num_heads, an MLP of mlp_ratio x d_model."""
  return {"model.d_model": d_model, "model.num_layers": num_layers,
          "model.num_heads": num_heads, "model.num_kv_heads": num_heads,
          "model.head_dim": d_model // num_heads, "model.mlp_dim": mlp_ratio * d_model}


def flatten(overrides, prefix=""):
  """{dotted key: value}; nested mappings ({"model": {"d_model": 8}}) become dotted keys."""
  out = {}
  for key, value in (overrides or {}).items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def key_problem(config, key):
  """None if `key` names a leaf of config, else why not (with the closest key)."""
  from tfusion import config_cli
  try:
    config_cli.check_key(config, key)
  except config_cli.ConfigError as e:
    return str(e)
  if "[" in key:  # an index into a sequence leaf: check_key checked the rest
    return None
  node = config
  for part in key.split("."):
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    return f"{key!r} is a block of keys, not a key"
  return None


apply_overrides = configlib.apply_overrides


def run_config(base, run):
  """The run's full config: a copy of `base` with its overrides, references resolved."""
  config = apply_overrides(copy.deepcopy(base), run.overrides)
  return config.copy_and_resolve_references()


# ---------------------------------------------------------------------------- schedule


def schedule_of(spec):
  return dict(SCHEDULE_DEFAULTS, **(spec.get("schedule") or {}))


def schedule_overrides(schedule, steps):
  """The config keys a run of `steps` steps gets from the schedule (DERIVED_KEYS).

  Warmup is a fraction of the run, clamped to [warmup_min, warmup_max] and below the run's
  length; the cosine decays over the whole run (optim.decay_steps = steps). Checkpoints every
  ceil(steps / evals) steps are kept for evaluation (keep_period) besides the final one; with
  checkpoint_every > 0, saves that often for resumption, the evaluated interval rounded up to a
  multiple of it (keep=2: the newest saves are kept too, so the eval job may see one more).
  """
  s = schedule
  warmup = round(steps * s["warmup_fraction"])
  warmup = min(max(warmup, s["warmup_min"]), s["warmup_max"], steps - 1)
  eval_every = math.ceil(steps / s["evals"])
  save_every = eval_every
  if s["checkpoint_every"]:
    save_every = min(s["checkpoint_every"], steps)
    eval_every = math.ceil(eval_every / save_every) * save_every
  return {"train.steps": steps, "optim.warmup_steps": max(warmup, 0), "optim.decay_steps": steps,
          "checkpoint.every_steps": save_every, "checkpoint.keep_period": eval_every,
          "checkpoint.keep": 2}


# -------------------------------------------------------------------------- validation


def _closest(word, choices):
  close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _override_sources(spec):
  """[(where, {dotted key: value})] of every override dict in the spec."""
  out = [("base_overrides", flatten(spec.get("base_overrides")))]
  for group in ("families", "sizes"):
    for name, overrides in (spec.get(group) or {}).items():
      out.append((f"{group}.{name}", flatten(overrides)))
  for name, budget in (spec.get("budgets") or {}).items():
    out.append((f"budgets.{name}", {k: v for k, v in flatten(budget).items()
                                    if k not in BUDGET_KINDS}))
  return out


def _structure_problems(spec):
  problems = []
  for key in spec:
    if key not in TOP_KEYS:
      problems.append(f"unknown spec key {key!r}{_closest(key, TOP_KEYS)}; "
                      f"known: {', '.join(TOP_KEYS)}")
  for key in REQUIRED:
    if not spec.get(key):
      problems.append(f"the spec needs {key!r}")
  for key in (spec.get("schedule") or {}):
    if key not in SCHEDULE_DEFAULTS:
      problems.append(f"unknown schedule key {key!r}{_closest(key, SCHEDULE_DEFAULTS)}; "
                      f"known: {', '.join(SCHEDULE_DEFAULTS)}")
  s = schedule_of(spec)
  if not 0 <= s.get("warmup_fraction", 0) < 1:
    problems.append(f"schedule.warmup_fraction must be in [0, 1), got {s['warmup_fraction']}")
  if not (isinstance(s.get("evals"), int) and s["evals"] >= 1):
    problems.append(f"schedule.evals must be an integer >= 1, got {s.get('evals')!r}")
  if not (isinstance(s.get("checkpoint_every"), int) and s["checkpoint_every"] >= 0):
    problems.append(f"schedule.checkpoint_every must be an integer >= 0, "
                    f"got {s.get('checkpoint_every')!r}")
  for name, budget in (spec.get("budgets") or {}).items():
    kinds = [k for k in BUDGET_KINDS if k in (budget or {})]
    if len(kinds) != 1:
      problems.append(f"budgets.{name}: give exactly one of 'tokens' or 'flops', got "
                      f"{sorted(budget or {})}")
    elif not isinstance(budget[kinds[0]], (int, float)) or not budget[kinds[0]] > 0:
      problems.append(f"budgets.{name}: {kinds[0]} must be a positive number, "
                      f"got {budget[kinds[0]]!r}")
  return problems


def _override_problems(spec, bases):
  """Every override dict checked against the base(s) it applies to: a family's against its own
  base, the shared ones (base_overrides, sizes, budgets) against every distinct base."""
  problems = []
  shared = list({id(b): b for b in bases.values()}.values())
  for where, overrides in _override_sources(spec):
    group, _, name = where.partition(".")
    for base in ([bases[name]] if group == "families" else shared):
      problems += _overrides_against(where, overrides, base)
  return list(dict.fromkeys(problems))  # one line per problem, not per base


def _overrides_against(where, overrides, base):
  problems = []
  trial = copy.deepcopy(base)
  for key, value in overrides.items():
    if key in DERIVED_KEYS:
      problems.append(f"{where}: {key} is derived from the budget by the schedule; "
                      "remove it (set schedule.* or the budget instead)")
      continue
    problem = key_problem(base, key)
    if problem:
      problems.append(f"{where}: {problem}")
      continue
    try:
      apply_overrides(trial, {key: value})
    except (TypeError, ValueError) as e:
      problems.append(f"{where}: {key}={value!r}: {str(e).splitlines()[0]}")
  return problems


def _suite_problems(spec):
  from tfusion.evaluate import suites as suites_lib
  if spec.get("base_config") == DEMO:
    from tfusion.demo import suites as demo_suites
    demo_suites.register()
  names = [p.strip() for p in str(spec.get("eval_suites") or "").split(",") if p.strip()]
  return [f"eval_suites: unknown suite {n!r}{_closest(n, suites_lib.SUITES)}; known: "
          f"{', '.join(sorted(suites_lib.SUITES))}" for n in names if n not in suites_lib.SUITES]


def validate(spec, base=None):
  """Raises SweepSpecError (one line per problem) unless the spec's structure, keys and
  suites are sound. Returns {family: base config} (family_bases; `base` loaded unless given)."""
  spec = as_dict(spec)
  problems = _structure_problems(spec)
  if problems:
    raise SweepSpecError(problems)
  bases = family_bases(spec, base)
  problems = _override_problems(spec, bases) + _suite_problems(spec)
  if problems:
    raise SweepSpecError(problems)
  return bases


# ---------------------------------------------------------------------------- expansion


_PARAMS = {}  # model config JSON -> parameter count (eval_shape is not free for big models)


def count_params(config):
  from tfusion import param_count
  key = config.model.to_json(sort_keys=True)
  if key not in _PARAMS:
    _PARAMS[key] = int(param_count.count(config.model)["total"])
  return _PARAMS[key]


def expand(spec, base=None):
  """-> [Run] of the spec in family, size, budget order. Validates first (SweepSpecError)."""
  from tfusion import flops as flops_lib
  spec = as_dict(spec)
  bases = validate(spec, base)
  schedule = schedule_of(spec)
  runs, problems, seen = [], [], {}
  for family, family_overrides in spec["families"].items():
    base = bases[family]
    for size, size_overrides in spec["sizes"].items():
      for budget_name, budget in spec["budgets"].items():
        name = f"{family}-{size}-{budget_name}"
        if name in seen:
          problems.append(f"duplicate run name {name!r}: {seen[name]} and "
                          f"({family}, {size}, {budget_name}); rename one")
          continue
        seen[name] = f"({family}, {size}, {budget_name})"
        merged = {**flatten(spec.get("base_overrides")), **flatten(family_overrides),
                  **flatten(size_overrides),
                  **{k: v for k, v in flatten(budget).items() if k not in BUDGET_KINDS}}
        config = apply_overrides(copy.deepcopy(base), merged).copy_and_resolve_references()
        params = count_params(config)
        per_step = flops_lib.train_flops_per_step(config, params)
        positions = config.data.batch_size * config.data.seq_len
        if "tokens" in budget:
          steps, unit = int(budget["tokens"] // positions), f"{positions:,} positions"
          given = f"{budget['tokens']:,} tokens"
        else:
          steps, unit = int(budget["flops"] // per_step), f"{per_step:.3g} FLOPs"
          given = f"{budget['flops']:.3g} FLOPs"
        if steps < 1:
          problems.append(f"budgets.{budget_name}: impossible budget for {name}: {given} is "
                          f"less than one step ({unit}: data.batch_size x data.seq_len"
                          f"{'' if 'tokens' in budget else ' at this size'})")
          continue
        merged.update(schedule_overrides(schedule, steps))
        params_nonembed = params - config.model.vocab_size * config.model.d_model
        tokens = steps * positions
        runs.append(Run(name=name, family=family, size=size, budget=budget_name,
                        overrides=merged, steps=steps, tokens=tokens, params=params,
                        params_nonembed=params_nonembed,
                        flops_6nd=float(6 * params_nonembed * tokens),
                        flops=float(steps * per_step)))
  if problems:
    raise SweepSpecError(problems)
  return runs


def fingerprint(spec, runs):
  """A hash of what the runs train: the base config's name and each run's name, steps and
  overrides. Eval suites and the spec's name are left out (adding a suite to a finished sweep
  is fine); so are the base config file's defaults, so a later tfusion with a new config key
  still recognises its sweep directories."""
  payload = {"base_config": as_dict(spec)["base_config"],
             "runs": [[r.name, r.steps, r.overrides] for r in runs]}
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def select(runs, only):
  """The runs whose names match any of the comma-separated fnmatch globs (all if empty)."""
  import fnmatch
  globs = [g.strip() for g in str(only or "").split(",") if g.strip()]
  if not globs:
    return list(runs)
  return [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in globs)]


def suites_of(spec):
  return [p.strip() for p in str(as_dict(spec).get("eval_suites") or "").split(",") if p.strip()]
