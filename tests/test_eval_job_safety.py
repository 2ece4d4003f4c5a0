"""tfusion-eval safety: a damaged checkpoint is skipped with a warning naming it (the watcher
goes on); suites' inputs are checked before any suite runs, in one line naming the config key;
--config.eval.* overrides work without --config (the run's stored config)."""

import glob
import json
import os
import subprocess
import sys

import pytest

import train_utils
from tfusion import metrics
from tfusion.evaluate import job, suites as suites_lib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Untrained checkpoints 2, 4 and 6 of the tiny model, and W/config.json (no training)."""
  import jax
  from tfusion import checkpoint, sharding, train_state
  root = tmp_path_factory.mktemp("evalsafety")
  config = train_utils.tiny_config(**{"train.steps": 6})
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  state = train_state.init_state(config, mesh, jax.random.PRNGKey(0))
  work = str(root / "run")
  ckpt = checkpoint.Checkpointer(work, keep=10, async_save=False)
  for step in (2, 4, 6):
    ckpt.save(step, state, {}, config.to_json_best_effort())
  ckpt.close()
  with open(os.path.join(work, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  return work, config


# Orbax's failed restore leaves an asyncio callback behind; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_is_skipped_and_the_watcher_goes_on(workdir, monkeypatch):
  work, config = workdir
  monkeypatch.setitem(suites_lib.SUITES, "probe", lambda ctx: {"probe": float(ctx.step)})
  damaged = os.path.join(work, "checkpoints", "4")
  for path in glob.glob(os.path.join(damaged, "state", "**", "d", "*"), recursive=True):
    os.remove(path)  # the array data files
  logs = []

  def log(line):
    logs.append(line)
    assert len(logs) < 20, f"the watcher loops: {logs[-3:]}"

  # Not --once: the watcher must not wait forever on the damaged step, nor stop before 6.
  assert job.run(work, ["probe"], config=config, poll_seconds=0.01, final_step=6,
                 log=log) == [2, 6]
  warnings = [line for line in logs if "warning" in line]
  assert len(warnings) == 1 and damaged in warnings[0] and "skipped" in warnings[0], logs
  got = metrics.read_jsonl(os.path.join(work, "metrics", "eval.jsonl"))
  assert sorted(r["step"] for r in got) == [2, 6]
  assert job.load_done(work) == {2: {"probe"}, 6: {"probe"}}  # 4 is retried by a new watcher


def test_inputs_are_checked_before_any_suite_runs(workdir, tmp_path, monkeypatch):
  work, config = workdir
  ran = []
  monkeypatch.setitem(suites_lib.SUITES, "ppl", lambda ctx: ran.append("ppl") or {"x": 1.0})
  monkeypatch.setitem(suites_lib.SUITES, "clip", lambda ctx: ran.append("clip") or {"x": 1.0})
  cfg = config.copy_and_resolve_references()
  (tmp_path / "tok.model").write_text("x")
  (tmp_path / "held.txt").write_text("a\n\nb\n")
  cfg.data.tokenizer = str(tmp_path / "tok.model")
  cfg.vae.path = str(tmp_path / "vae")  # missing
  cfg.eval.ppl_files = f"{tmp_path / 'held.txt'},{tmp_path / 'gone.txt'}"
  with pytest.raises(ValueError) as e:
    job.run(work, ["ppl", "clip"], config=cfg, once=True, log=lambda s: None)
  msg = str(e.value)
  assert "\n" not in msg and not ran
  assert f"config.eval.ppl_files: '{tmp_path / 'gone.txt'}' does not exist (suite ppl)" in msg
  assert "suite clip needs config.eval.prompts, which is empty" in msg
  assert "suite clip needs config.eval.clip_weights" in msg
  assert f"config.vae.path: '{tmp_path / 'vae'}' does not exist (suite clip)" in msg
  cfg.eval.loss_text = str(tmp_path / "none")
  with pytest.raises(ValueError, match=r"config.eval.loss_text: .*none.* matches no ArrayRecord"):
    job.check_inputs(cfg, ["loss"])
  cfg.eval.loss_text = ""
  with pytest.raises(ValueError, match="needs config.eval.loss_text or config.eval.loss_image"):
    job.check_inputs(cfg, ["loss"])


def _eval_cli(work, *flags):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tfusion.evaluate.job", f"--workdir={work}",
                         *flags], env=env, capture_output=True, text=True, timeout=300)


def test_eval_overrides_without_config_and_typos(workdir, tmp_path):
  work, _ = workdir
  proc = _eval_cli(work, "--show_config", "--config.eval.num_samples=7")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "eval.num_samples = 7" in proc.stdout.splitlines()
  assert "train.steps = 6" in proc.stdout.splitlines()  # the run's stored config

  missing = str(tmp_path / "missing.txt")
  proc = _eval_cli(work, "--once", "--suites=ppl", f"--config.eval.ppl_files={missing}")
  assert proc.returncode == 2
  err = proc.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("tfusion-eval: error:"), proc.stderr[-2000:]
  assert f"config.eval.ppl_files: '{missing}' does not exist" in err[0]
  assert "config.data.tokenizer" in err[0]

  proc = _eval_cli(work, "--once", "--config.eval.ppl_filez=x")
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("tfusion-eval: error: --config.eval.ppl_filez=x: the config has "
                                 "no key 'eval.ppl_filez' (did you mean 'eval.ppl_files'?)")
  assert not os.path.exists(os.path.join(work, "metrics", "eval_state.json.tmp"))
  with open(os.path.join(work, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["eval"]["num_samples"] != 7  # overrides never rewrite the run's config


def test_a_result_in_eval_jsonl_counts_as_done_without_the_state_file(tmp_path):
  """A watcher killed after writing a result but before saving eval_state.json must not
  evaluate that suite again on restart (eval.jsonl is what users plot)."""
  from tfusion import metrics
  from tfusion.evaluate import job
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(os.path.join(workdir, "metrics", "eval.jsonl"))
  writer.write(3, {"ppl/held": 12.0}, suite="ppl")
  writer.close()
  assert job.load_done(workdir) == {3: {"ppl"}}
  job._save_done(workdir, {6: {"ppl", "mc"}})
  assert job.load_done(workdir) == {3: {"ppl"}, 6: {"ppl", "mc"}}
