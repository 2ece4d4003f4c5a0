"""tfusion-sweep: spec validation and expansion, plan and launch output, the sweep directory's
fingerprint, the registry, and a resumable local run of a tiny two-run spec."""

import copy
import json
import math
import os
import subprocess

import pytest

import train_utils
from tfusion.scaling import registry, spec as spec_lib, sweep

ROWS, LEN = 8, 48
POSITIONS = ROWS * LEN  # positions per step of the specs below

TINY_MODEL = {"model.d_model": 32, "model.num_heads": 2, "model.num_kv_heads": 2,
              "model.head_dim": 16, "model.mlp_dim": 64, "model.vocab_size": 64,
              "model.image.latent_size": 4, "data.seq_len": LEN, "data.batch_size": ROWS,
              "data.max_images": 2}


def make_spec(**changes):
  """A 2 families x 2 sizes x 2 budgets spec on experiments/configs/tiny.py."""
  spec = {
      "name": "t", "base_config": train_utils.TINY, "base_overrides": dict(TINY_MODEL),
      "families": {"bi": {"model.intra_image": "bidirectional"},
                   "causal": {"model.intra_image": "causal"}},
      "sizes": {"s1": {}, "s2": {"model.d_model": 64, "model.num_heads": 4,
                                 "model.num_kv_heads": 4, "model.mlp_dim": 128}},
      "budgets": {"b1": {"tokens": 10 * POSITIONS}, "b2": {"tokens": 40 * POSITIONS + 100}},
      "schedule": {"warmup_fraction": 0.1, "warmup_min": 2, "warmup_max": 100, "evals": 2},
      "eval_suites": "loss",
  }
  spec.update(copy.deepcopy(changes))
  return spec


def write_spec(path, spec):
  path.write_text("def get_sweep():\n  return " + repr(spec) + "\n")
  return str(path)


def problems_of(spec):
  with pytest.raises(spec_lib.SweepSpecError) as e:
    spec_lib.expand(spec)
  return str(e.value)


# ------------------------------------------------------------------------------ validation


def test_unknown_keys_say_where_and_suggest():
  sizes = {"s1": {}, "s2": {"model.d_modle": 64}}
  text = problems_of(make_spec(sizes=sizes))
  assert "sizes.s2" in text and "did you mean 'model.d_model'" in text
  text = problems_of(make_spec(families={"x": {"model.intra_imag": "causal"}}))
  assert "families.x" in text and "'model.intra_image'" in text
  spec = make_spec()
  spec["familes"] = spec.pop("families")
  text = problems_of(spec)
  assert "unknown spec key 'familes'" in text and "did you mean 'families'" in text
  # Keys the schedule derives from the budget cannot be set by hand.
  text = problems_of(make_spec(budgets={"b1": {"tokens": 10 * POSITIONS, "train.steps": 3}}))
  assert "budgets.b1: train.steps is derived" in text
  # A value of the wrong type names the key and where it is.
  text = problems_of(make_spec(base_overrides=dict(TINY_MODEL, **{"model.d_model": "wide"})))
  assert "base_overrides: model.d_model='wide'" in text
  text = problems_of(make_spec(eval_suites="loss,ppx"))
  assert "unknown suite 'ppx'" in text


def test_impossible_budgets_and_duplicate_names():
  text = problems_of(make_spec(budgets={"tiny": {"tokens": POSITIONS - 1}}))
  assert "budgets.tiny: impossible budget" in text
  assert len(text.splitlines()) == 4  # one line per run it makes impossible
  text = problems_of(make_spec(budgets={"tiny": {"flops": 1e6}}))
  assert "impossible budget" in text and "less than one step" in text
  text = problems_of(make_spec(budgets={"both": {"tokens": 1e6, "flops": 1e12}}))
  assert "budgets.both: give exactly one of 'tokens' or 'flops'" in text
  # "a-b" x "c" and "a" x "b-c" both make "a-b-c-b1".
  text = problems_of(make_spec(families={"a-b": {}, "a": {}}, sizes={"c": {}, "b-c": {}},
                               budgets={"b1": {"tokens": 10 * POSITIONS}}))
  assert "duplicate run name 'a-b-c-b1'" in text


# ------------------------------------------------------------------------------- expansion


def test_expand_token_budgets():
  from tfusion import flops
  spec = make_spec()
  runs = spec_lib.expand(spec)
  assert [r.name for r in runs] == [f"{f}-{s}-{b}" for f in ("bi", "causal")
                                    for s in ("s1", "s2") for b in ("b1", "b2")]
  base = spec_lib.load_base_config(spec)
  by_name = {r.name: r for r in runs}
  for run in runs:
    expected = 10 if run.budget == "b1" else 40  # 100 positions short of a 41st step
    assert run.steps == expected and run.tokens == expected * POSITIONS
    o = run.overrides
    assert o["train.steps"] == o["optim.decay_steps"] == run.steps  # cosine over the run
    assert o["optim.warmup_steps"] == max(2, round(0.1 * run.steps))
    assert o["checkpoint.every_steps"] == o["checkpoint.keep_period"] == math.ceil(run.steps / 2)
    config = spec_lib.run_config(base, run)
    assert config.train.steps == run.steps and config.optim.decay_steps == run.steps
    assert config.model.intra_image == ("causal" if run.family == "causal" else "bidirectional")
    assert config.model.d_model == (64 if run.size == "s2" else 32)
    assert run.params_nonembed == run.params - 64 * config.model.d_model
    assert run.flops_6nd == 6 * run.params_nonembed * run.tokens
    assert run.flops == run.steps * flops.train_flops_per_step(config, run.params)
  assert by_name["bi-s2-b1"].params > by_name["bi-s1-b1"].params
  assert by_name["bi-s1-b1"].params == by_name["causal-s1-b1"].params
  assert spec_lib.select(runs, "*-s1-*,causal-s2-b2") == [
      by_name[n] for n in ("bi-s1-b1", "bi-s1-b2", "causal-s1-b1", "causal-s1-b2",
                           "causal-s2-b2")]


def test_expand_flops_budgets_are_isoflop():
  from tfusion import flops
  spec = make_spec(families={"bi": {}})
  base = spec_lib.load_base_config(spec)
  big = [r for r in spec_lib.expand(spec) if r.size == "s2"][0]
  per_step_big = flops.train_flops_per_step(spec_lib.run_config(base, big), big.params)
  budget = 50.5 * per_step_big
  runs = spec_lib.expand(make_spec(families={"bi": {}}, budgets={"c": {"flops": budget}}))
  small, large = runs
  assert large.steps == 50 and small.steps > 60
  for run in runs:
    per_step = run.flops / run.steps
    assert budget - per_step < run.flops <= budget
    assert run.overrides["optim.decay_steps"] == run.steps
  assert abs(small.flops / large.flops - 1) < 0.02


def test_schedule_overrides():
  s = dict(spec_lib.SCHEDULE_DEFAULTS, warmup_fraction=0.1, warmup_min=10, warmup_max=50)
  assert spec_lib.schedule_overrides(dict(s, evals=4), 100) == {
      "train.steps": 100, "optim.warmup_steps": 10, "optim.decay_steps": 100,
      "checkpoint.every_steps": 25, "checkpoint.keep_period": 25, "checkpoint.keep": 2}
  assert spec_lib.schedule_overrides(s, 1000)["optim.warmup_steps"] == 50  # the max
  assert spec_lib.schedule_overrides(s, 5)["optim.warmup_steps"] == 4  # below the run's length
  o = spec_lib.schedule_overrides(dict(s, evals=3, checkpoint_every=10), 100)
  assert o["checkpoint.every_steps"] == 10 and o["checkpoint.keep_period"] == 40


def test_paper_and_demo_specs_expand():
  paper = spec_lib.expand(spec_lib.load(os.path.join(spec_lib.repo_root(), "experiments",
                                                     "sweeps", "paper.py")))
  assert len(paper) == 10 and {r.steps for r in paper} == {250_000}
  params = sorted({r.params_nonembed for r in paper})
  assert 6e9 < params[-1] < 8e9 and params[0] < 0.2e9
  demo = spec_lib.expand(spec_lib.load(os.path.join(spec_lib.repo_root(), "experiments",
                                                    "sweeps", "demo.py")))
  assert len(demo) == 16 and len({r.family for r in demo}) == 2


# ------------------------------------------------------------- a family with its own base

DEMO_SIZE = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
             "model.num_kv_heads": 2, "model.head_dim": 16, "model.mlp_dim": 64}


def chameleon_spec(**changes):
  """The demo base with a continuous and a discrete (own base) family, one size, one budget."""
  spec = {"name": "cham", "base_config": "demo", "base_overrides": {"data.batch_size": 4},
          "families": {"tf": {}, "ch": {"model.image.representation": "discrete"}},
          "sizes": {"s": dict(DEMO_SIZE)}, "budgets": {"c": {"flops": 2e10}},
          "eval_suites": "ppl"}
  spec.update(copy.deepcopy(changes))
  return spec


def test_discrete_family_is_expanded_and_counted_against_its_own_base():
  from tfusion import flops
  from tfusion.demo import config as demo_config
  spec = chameleon_spec()
  bases = spec_lib.family_bases(spec)
  discrete = demo_config.get_config(representation="discrete")
  continuous = demo_config.get_config()
  assert bases["ch"].model.vocab_size == discrete.model.vocab_size != continuous.model.vocab_size
  assert bases["ch"].model.image.latent_size == discrete.model.image.latent_size == 4
  assert bases["ch"].demo.representation == "discrete"
  assert bases["tf"].model.vocab_size == continuous.model.vocab_size
  assert bases["tf"].demo.representation == "continuous"
  tf, ch = spec_lib.expand(spec)
  assert (tf.family, ch.family) == ("tf", "ch")
  config = spec_lib.run_config(bases["ch"], ch)
  assert config.model.image.representation == "discrete"
  assert config.model.vocab_size == discrete.model.vocab_size
  assert config.model.image.codebook_size == discrete.model.image.codebook_size
  assert config.model.d_model == 32 and config.data.batch_size == 4
  assert ch.params == spec_lib.count_params(config)
  assert ch.params_nonembed == ch.params - discrete.model.vocab_size * 32
  per_step = flops.train_flops_per_step(config, ch.params)
  assert ch.steps == int(2e10 // per_step) and ch.flops == ch.steps * per_step
  # The continuous base with the discrete override would count other FLOPs (its vocabulary).
  wrong = spec_lib.run_config(continuous, ch)
  assert flops.train_flops_per_step(wrong, spec_lib.count_params(wrong)) != per_step
  assert spec_lib.run_config(bases["tf"], tf).model.vocab_size == continuous.model.vocab_size
  # Keys of a family are checked against its own base.
  text = problems_of(chameleon_spec(families={"ch": {"model.image.representation": "discrete",
                                                     "model.image.codebok_size": 8}}))
  assert "families.ch" in text and "'model.image.codebook_size'" in text


def test_discrete_family_data_in_its_own_root(tmp_path, monkeypatch, capsys):
  from tfusion.demo import main as demo_main
  S = str(tmp_path / "S")
  spec = chameleon_spec()
  bases = spec_lib.family_bases(spec)
  extra = sweep.family_data_overrides(spec, S, bases)
  disc = os.path.join(S, "discrete")
  assert extra["ch"]["data.tokenizer"] == os.path.join(disc, "data", "tokenizer.model")
  assert extra["ch"]["vae.path"] == os.path.join(disc, "vae")
  assert extra["tf"]["data.tokenizer"] == os.path.join(S, "data", "tokenizer.model")
  assert extra["tf"]["vae.path"] == os.path.join(S, "vae")
  assert set(extra["ch"]) == set(extra["tf"])
  for key, value in extra["ch"].items():
    assert value.startswith(disc + os.sep), key
    assert value.replace(disc, S) == extra["tf"][key], key
  for value in extra["tf"].values():
    assert not value.startswith(disc)

  # --prepare: each representation's stages, with its own config, in its own root.
  calls = []
  for stage in ("stage_tokenizer", "stage_vae", "stage_records"):
    monkeypatch.setattr(demo_main, stage, lambda config, p, stage=stage: calls.append(
        (stage, config.model.image.representation, config.model.vocab_size,
         config.data.batch_size, p["data"], p["vae"])))
  sweep.prepare_demo(spec, bases, S, log=lambda m: None)
  by_rep = {}
  for stage, rep, vocab, rows, data, vae in calls:
    by_rep.setdefault(rep, set()).add((vocab, rows, data, vae))
  assert by_rep == {
      "continuous": {(bases["tf"].model.vocab_size, 4, os.path.join(S, "data"),
                      os.path.join(S, "vae"))},
      "discrete": {(bases["ch"].model.vocab_size, 4, os.path.join(disc, "data"),
                    os.path.join(disc, "vae"))}}
  assert len(calls) == 6

  # The launch commands build each family's base (tfusion-train --config) and paths.
  from tfusion import configlib
  path = write_spec(tmp_path / "spec.py", spec)
  capsys.readouterr()
  assert sweep.main([path, "--dir", S, "--print-launch", "tpu"]) == 0
  lines = [line for line in capsys.readouterr().out.splitlines() if "tpu_pod.sh" in line]
  ch_line = [line for line in lines if "/runs/ch-" in line][0]
  tf_line = [line for line in lines if "/runs/tf-" in line][0]
  assert "--config tfusion/scaling/demo_base.py:discrete" in ch_line
  assert f"--config.vae.path={os.path.join(disc, 'vae')}" in ch_line.split()
  assert "--config tfusion/demo/config.py " in tf_line
  assert f"--config.vae.path={os.path.join(S, 'vae')}" in tf_line.split()
  built = configlib.load_config_file(
      os.path.join(spec_lib.repo_root(), "tfusion/scaling/demo_base.py:discrete"))
  assert built.to_json(sort_keys=True) == bases["ch"].to_json(sort_keys=True)


def test_spec_without_discrete_families_keeps_fingerprint_and_paths(tmp_path):
  # experiments/sweeps/demo.py's fingerprint before families could have their own base: sweep
  # directories made by it must still be recognised (update only with a deliberate change of
  # demo.py's grid, which makes old directories another spec's).
  spec = spec_lib.load(os.path.join(spec_lib.repo_root(), "experiments", "sweeps", "demo.py"))
  runs = spec_lib.expand(spec)
  assert spec_lib.fingerprint(spec, runs) == "14437c5e817bad8b"
  assert all(spec_lib.own_base(spec, f) is None for f in spec["families"])
  S = str(tmp_path / "S")
  bases = spec_lib.family_bases(spec)
  assert len({id(b) for b in bases.values()}) == 1
  for extra in sweep.family_data_overrides(spec, S, bases).values():
    assert extra == sweep.data_overrides(spec, S, spec_lib.load_base_config(spec))
    assert extra["vae.path"] == os.path.join(S, "vae")
    assert extra["data.tokenizer"] == os.path.join(S, "data", "tokenizer.model")
  # The same for the chameleon spec's continuous family alone.
  tf_only = chameleon_spec(families={"tf": {}})
  assert sweep.family_data_overrides(tf_only, S, spec_lib.family_bases(tf_only))["tf"] == \
      sweep.data_overrides(tf_only, S, spec_lib.load_base_config(tf_only))


def test_bad_representation_is_one_clear_error():
  text = problems_of(chameleon_spec(families={"tf": {}, "ch": {
      "model.image.representation": "discret"}}))
  assert text.splitlines() == [
      "families.ch: model.image.representation must be one of ('continuous', 'discrete'), "
      "got 'discret'"]
  # A non-demo base has no own bases, but the value is checked the same way.
  text = problems_of(make_spec(families={"x": {"model.image.representation": "vq"}}))
  assert text.splitlines() == [
      "families.x: model.image.representation must be one of ('continuous', 'discrete'), "
      "got 'vq'"]


# ------------------------------------------------------------------------ plan and launch


def test_plan_and_print_launch(tmp_path, capsys):
  path = write_spec(tmp_path / "spec.py", make_spec())
  runs = spec_lib.expand(make_spec())
  assert sweep.main([path, "--only", "*-s1-*"]) == 0
  out = capsys.readouterr().out
  assert "4 of 8 runs" in out and "total (4 runs)" in out
  assert "bi-s1-b1" in out and "bi-s2-b1" not in out
  assert f"{sum(r.flops for r in runs if r.size == 's1'):.3g}" in out

  sweep_dir = str(tmp_path / "S")
  assert sweep.main([path, "--dir", sweep_dir, "--print-launch", "slurm"]) == 0
  script = capsys.readouterr().out
  assert "#SBATCH --array=0-7" in script and script.count("TRAIN=(") == 8
  for run in runs:
    assert script.count(f"W={registry.run_dir(sweep_dir, run.name)};") == 1
  assert script.count("--config.train.steps=10") == 4 and "--config.optim.decay_steps=40" in script
  assert "bash launch/slurm.sbatch" in script and "tfusion-eval --workdir" in script
  assert f"{sum(r.flops for r in runs):.3g}" in script and "H100-days" in script
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash

  assert sweep.main([path, "--dir", sweep_dir, "--print-launch", "tpu"]) == 0
  script = capsys.readouterr().out
  assert script.count("launch/tpu_pod.sh --tpu") == 8 and script.count("tfusion-eval") == 8
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_another_spec_is_refused_in_its_sweep_dir(tmp_path, capsys):
  sweep_dir = str(tmp_path / "S")
  first = write_spec(tmp_path / "a.py", make_spec())
  assert sweep.main([first, "--dir", sweep_dir, "--print-launch", "slurm"]) == 0
  assert registry.read_sweep(sweep_dir) is None  # S may be a cluster path: only checked
  assert sweep.main([first, "--dir", sweep_dir, "--collect"]) == 0
  made = registry.read_sweep(sweep_dir)
  assert made["name"] == "t" and len(made["runs"]) == 8
  other = write_spec(tmp_path / "b.py",
                     make_spec(name="u", budgets={"b1": {"tokens": 11 * POSITIONS}}))
  capsys.readouterr()
  assert sweep.main([other, "--dir", sweep_dir, "--run"]) == 2
  err = capsys.readouterr().err.strip()
  assert sweep.main([other, "--dir", sweep_dir, "--print-launch", "tpu"]) == 2
  assert len(err.splitlines()) == 1
  assert f"{sweep_dir} was made by spec 't' (fingerprint {made['fingerprint']})" in err
  assert "this is 'u'" in err and "use another --dir" in err
  assert registry.read_sweep(sweep_dir) == made
  # Another eval suite on the same runs is the same sweep.
  same = write_spec(tmp_path / "c.py", make_spec(eval_suites="loss,ppl"))
  assert sweep.main([same, "--dir", sweep_dir, "--collect"]) == 0


# ------------------------------------------------------------------------------- registry


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


def test_registry_rows_from_workdirs(tmp_path):
  S = str(tmp_path)
  run = {"family": "bi", "size": "s1", "params": 1000, "params_nonembed": 800,
         "overrides": {}, "tokens": 4 * POSITIONS, "steps": 4, "flops": 4e9, "flops_6nd": 0.0}
  runs = [dict(run, name="done", budget="b1"), dict(run, name="half", budget="b2"),
          dict(run, name="never", budget="b3")]
  with open(os.path.join(S, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump({"name": "t", "fingerprint": "f", "eval_suites": ["loss", "ppl"], "runs": runs}, f)
  w = registry.run_dir(S, "done")
  os.makedirs(os.path.join(w, "checkpoints", "4"))
  with open(os.path.join(w, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"data": {"batch_size": ROWS, "seq_len": LEN},
               "model": {"image": {"latent_size": 8, "patch_size": 2}}}, f)
  _write_jsonl(os.path.join(w, "metrics", "train.jsonl"), [
      {"step": s, "loss": 1.0, "text_tokens": 10.0 * s, "images": 2.0} for s in (1, 2, 3, 4)])
  _write_jsonl(os.path.join(w, "metrics", "eval.jsonl"), [
      {"step": 2, "suite": "loss", "loss/image": 0.5, "train_flops": 2.2e9, "settings": {}},
      {"step": 4, "suite": "loss", "loss/image": 0.4, "train_flops": 4.4e9, "seconds": 1.0},
      {"step": 4, "suite": "ppl", "ppl/heldout": 60.0, "train_flops": 4.4e9},
      {"step": 4, "suite": "loss", "loss/image": 0.3, "train_flops": 4.4e9}])  # a redo: wins
  h = registry.run_dir(S, "half")
  os.makedirs(os.path.join(h, "checkpoints", "2"))
  _write_jsonl(os.path.join(h, "metrics", "eval.jsonl"), [
      {"step": 2, "suite": "loss", "loss/image": 0.6}])

  rows, missing = registry.collect(S)
  with open(os.path.join(S, "runs.jsonl"), encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == rows
  done = [r for r in rows if r["run"] == "done"]
  assert [(r["step"], r["final"]) for r in done] == [(2, False), (4, True)]
  final = done[1]
  assert final["metrics"] == {"loss/image": 0.3, "ppl/heldout": 60.0}
  assert final["tokens"] == 4 * POSITIONS and done[0]["tokens"] == 2 * POSITIONS
  assert final["flops_6nd"] == 6 * 800 * 4 * POSITIONS and final["flops"] == 4.4e9
  assert final["text_tokens"] == 25.0 * 4  # mean of 10, 20, 30, 40 per step, times 4 steps
  assert done[0]["text_tokens"] == 15.0 * 2  # only the steps logged up to step 2
  assert final["image_patches"] == 2.0 * 16 * 4  # 16 patches per 8x8 latent at 2x2
  assert final["family"] == "bi" and final["budget"] == "b1" and final["params"] == 1000
  half = [r for r in rows if r["run"] == "half"]
  assert len(half) == 1 and not half[0]["final"] and half[0]["flops"] == 2e9  # computed
  assert dict(missing) == {"half": "final step 4 not evaluated (trained to step 2 of 4)",
                           "never": "not started"}


# ------------------------------------------------------------------------- local end to end


@pytest.mark.slow  # trains and compiles: tens of seconds
def test_run_trains_evaluates_skips_and_resumes(tmp_path, capsys):
  from tfusion import metrics, train
  data = train_utils.grain_data(tmp_path)
  overrides = {**TINY_MODEL, **data, "train.log_every": 1, "eval.loss_text": data["data.text"],
               "eval.loss_image_caption": data["data.image_caption"], "eval.loss_rows": 8,
               "eval.batch_size": 8}
  spec = make_spec(base_overrides=overrides, families={"bi": {}}, sizes={"s": {}},
                   budgets={"b1": {"tokens": 3 * POSITIONS}, "b2": {"tokens": 5 * POSITIONS}},
                   schedule={"warmup_min": 1, "evals": 1})
  path = write_spec(tmp_path / "spec.py", spec)
  S = str(tmp_path / "S")
  with train_utils.compiled_steps_reused():
    assert sweep.main([path, "--dir", S, "--run", "--only", "*-b1"]) == 0
    out = capsys.readouterr().out
    assert "training 3 steps" in out
    rows, missing = registry.collect(S)
    assert [(r["run"], r["step"], r["final"]) for r in rows] == [("bi-s-b1", 3, True)]
    assert rows[0]["metrics"]["loss/image"] > 0 and rows[0]["tokens"] == 3 * POSITIONS
    assert rows[0]["text_tokens"] > 0 and rows[0]["image_patches"] > 0
    assert dict(missing) == {"bi-s-b2": "not started"}

    # b2 killed at step 2: its newest checkpoint is step 2, nothing evaluated.
    run = spec_lib.expand(spec)[1]
    config = spec_lib.run_config(spec_lib.load_base_config(spec), run)
    config.train.steps = 2
    assert train.train_and_evaluate(config, registry.run_dir(S, run.name))["step"] == 2
    capsys.readouterr()
    assert sweep.main([path, "--dir", S, "--run"]) == 0
    out = capsys.readouterr().out
    assert "bi-s-b1: done (final step 3 evaluated), skipped" in out
    assert "steps 2->5" in out  # resumed, not restarted
    rows, missing = registry.collect(S)
    assert ("bi-s-b2", 5, True) in [(r["run"], r["step"], r["final"]) for r in rows]
    assert not missing
    logged = [r["step"] for r in metrics.read_jsonl(
        os.path.join(registry.run_dir(S, run.name), "metrics", "train.jsonl"))]
    assert logged == [1, 2, 3, 4, 5]

    assert sweep.main([path, "--dir", S, "--run"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 2 and "training" not in out
