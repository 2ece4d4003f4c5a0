"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) and resumed ends bitwise equal
to an uninterrupted run, with identical logged losses after the checkpoint; a resume on the
Grain pipeline starts from the newest of several checkpoints."""

import os
import signal

import numpy as np
import pytest

import train_utils

N = 8
TOTAL = 5 * N  # room for the SIGTERM to land anywhere after checkpoint N


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  train_utils.run_train(workdir, f"--config.train.steps={TOTAL}",
                        f"--config.checkpoint.every_steps={N}")
  return workdir


def _assert_same_as(straight, resumed, resumed_from):
  step_a, params_a = train_utils.final_params(straight)
  step_b, params_b = train_utils.final_params(resumed)
  assert step_a == step_b == TOTAL
  for a, b in zip(params_a, params_b):
    np.testing.assert_array_equal(a, b)
  losses_a, losses_b = train_utils.losses_by_step(straight), train_utils.losses_by_step(resumed)
  for step in range(resumed_from + 1, TOTAL + 1):
    assert losses_a[step] == losses_b[step], f"step {step}"


def _checkpoint_ready(workdir, step):
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_exactly(straight_run, tmp_path, sig):
  workdir = str(tmp_path / "interrupted")
  # Many steps, so the signal surely lands mid-run; the resumed run then stops at TOTAL.
  proc = train_utils.start_train(workdir, "--config.train.steps=100000",
                                 f"--config.checkpoint.every_steps={N}")
  train_utils.wait_for(lambda: _checkpoint_ready(workdir, N), what=f"checkpoint {N}")
  os.kill(proc.pid, sig)
  _, err = proc.communicate(timeout=120)
  ckpts = os.path.join(workdir, "checkpoints")
  saved = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  if sig == signal.SIGKILL:
    assert proc.returncode == -signal.SIGKILL
    resume_from = N
  else:
    assert proc.returncode == 0, err[-2000:]
    resume_from = saved[-1]  # the handler's checkpoint at the step it had reached
    assert N <= resume_from < TOTAL, f"SIGTERM checkpoint at {resume_from}"
  for d in saved:  # the resumed run must start from `resume_from`
    if d > resume_from:
      os.rename(os.path.join(ckpts, str(d)), os.path.join(ckpts, f"later-{d}"))
  train_utils.run_train(workdir, f"--config.train.steps={TOTAL}",
                        f"--config.checkpoint.every_steps={N}")
  _assert_same_as(straight_run, workdir, resume_from)


def test_resume_on_grain_data_starts_from_the_newest_checkpoint(tmp_path):
  """A run to step 6 with checkpoints 3 and 6, continued to step 8 on the Grain pipeline: the
  continuation must start from the newest checkpoint and perform exactly steps 7 and 8."""
  from tfusion import checkpoint, train
  overrides = dict(train_utils.grain_data(tmp_path), **{
      "train.steps": 6, "checkpoint.every_steps": 3, "checkpoint.keep": 3})
  workdir = str(tmp_path / "run")
  assert train.train_and_evaluate(train_utils.tiny_config(**overrides), workdir)["step"] == 6
  assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [3, 6]
  first_run = train_utils.losses_by_step(workdir)
  logged = []  # the steps the continued run performs and logs (log_every=1)
  overrides["train.steps"] = 8
  out = train.train_and_evaluate(train_utils.tiny_config(**overrides), workdir,
                                 on_log=lambda step, scalars: logged.append(step))
  assert out["step"] == 8 and logged == [7, 8]
  assert train_utils.final_params(workdir)[0] == 8
  losses = train_utils.losses_by_step(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert all(losses[s] == first_run[s] for s in range(1, 7))
