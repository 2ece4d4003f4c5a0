"""EMA weights (config.train.ema_decay): the average the train step keeps equals one computed
by hand from the params of every step, resumes exactly, can be switched on or off at a
resume, comes along with a fork, and is what eval/generate use unless told otherwise."""

import os

import jax
import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, ema, train

DECAY = 0.8
STEPS = 6


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _config(**overrides):
  return train_utils.tiny_config(**{"train.steps": STEPS, "checkpoint.every_steps": 3,
                                    "train.ema_decay": DECAY, **overrides})


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """6 steps with EMA, checkpoints at 3 and 6, and the params after every step."""
  workdir = str(tmp_path_factory.mktemp("ema"))
  seen = {}
  original = train.make_train_step

  def recording_step(config, mesh, shardings):  # keeps a host copy of the params per step
    step_fn = original(config, mesh, shardings)

    def run(state, batch):
      state, out = step_fn(state, batch)
      seen[int(state["step"])] = _leaves(state["params"])
      return state, out

    return run

  train.make_train_step = recording_step
  try:
    config = _config()
    out = train.train_and_evaluate(config, workdir)
  finally:
    train.make_train_step = original
  return workdir, config, seen, out


def test_decay_ramps_up_and_bad_decay_is_refused():
  import jax.numpy as jnp
  assert float(ema.decay_at(0.999, jnp.int32(0))) == pytest.approx(0.1)
  assert float(ema.decay_at(0.999, jnp.int32(90))) == pytest.approx(0.91)
  assert float(ema.decay_at(0.5, jnp.int32(1000))) == pytest.approx(0.5)
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match="config.train.ema_decay"):
      ema.check_decay(bad)
  with pytest.raises(ValueError, match="config.train.ema_decay"):
    train.train_and_evaluate(_config(**{"train.ema_decay": 1.0}), "/nonexistent/never/made")


def test_average_equals_brute_force_over_the_steps(ema_run):
  workdir, _, seen, out = ema_run
  # Brute force: from the init params, fold in each step's params with the ramped decay.
  init = _init_params()
  expected = init
  for step in range(STEPS):
    d = min(DECAY, (1 + step) / (10 + step))
    expected = [d * e + (1 - d) * p for e, p in zip(expected, seen[step + 1])]
  got = _leaves(out["state"][ema.KEY])
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-6)
  # and it is not just the params
  assert any(not np.allclose(g, p) for g, p in zip(got, seen[STEPS]))


def _init_params():
  from tfusion import sharding, train_state
  config = _config()
  mesh = sharding.make_mesh(config.mesh)
  return _leaves(train_state.init_state(config, mesh, jax.random.PRNGKey(config.seed))["params"])


def test_resume_is_exact_with_the_average(ema_run, tmp_path):
  workdir, config, _, out = ema_run
  import shutil
  copy = str(tmp_path / "resumed")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", str(STEPS)))
  resumed = train.train_and_evaluate(config, copy)
  for a, b in zip(_leaves(out["state"][ema.KEY]), _leaves(resumed["state"][ema.KEY])):
    np.testing.assert_array_equal(a, b)


def test_eval_weights_auto_ema_raw(ema_run):
  workdir, _, _, out = ema_run
  averaged, _, _, source = checkpoint.restore_params(workdir, weights="auto", with_source=True)
  assert source == "ema"
  for a, b in zip(_leaves(averaged), _leaves(out["state"][ema.KEY])):
    np.testing.assert_array_equal(a, b)
  raw, _, _ = checkpoint.restore_params(workdir, weights="raw")
  for a, b in zip(_leaves(raw), _leaves(out["state"]["params"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="weights"):
    checkpoint.restore_params(workdir, weights="average")


def test_switched_on_at_resume_starts_from_the_params(tmp_path, caplog):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(**{"train.ema_decay": 0.0, "train.steps": 3}), workdir)
  with pytest.raises(checkpoint.NoEMAWeightsError, match="ema_decay=0"):
    checkpoint.restore_params(workdir, weights="ema")
  params_3, _, _ = checkpoint.restore_params(workdir)
  with caplog.at_level("WARNING"):
    out = train.train_and_evaluate(_config(**{"train.steps": 4}), workdir)
  assert "has no EMA weights" in caplog.text
  # One update after the resume at step 3: d = min(0.8, 4/13) from the step-3 params.
  d = 4 / 13
  for e, p3, p4 in zip(_leaves(out["state"][ema.KEY]), _leaves(params_3),
                       _leaves(out["state"]["params"])):
    np.testing.assert_allclose(e, d * p3 + (1 - d) * p4, rtol=2e-5, atol=1e-6)


def test_switched_off_at_resume_drops_it_with_a_warning(ema_run, tmp_path, caplog):
  workdir, _, _, _ = ema_run
  import shutil
  copy = str(tmp_path / "off")
  shutil.copytree(workdir, copy)
  with caplog.at_level("WARNING"):
    out = train.train_and_evaluate(_config(**{"train.ema_decay": 0.0, "train.steps": 7}), copy)
  assert "has EMA weights but config.train.ema_decay=0" in caplog.text
  assert ema.KEY not in out["state"]
  _, _, step, source = checkpoint.restore_params(copy, with_source=True)
  assert (step, source) == (7, "raw")


def test_fork_with_optimizer_takes_the_average(ema_run, tmp_path):
  workdir, _, _, out = ema_run
  child = str(tmp_path / "child")
  forked = train.train_and_evaluate(_config(**{"train.steps": 1}), child,
                                    init_from=f"{workdir}:{STEPS}", init_what="params+opt")
  # After one step from the parent's average (d = 0.1 at the fork's step 0).
  parent_ema = _leaves(out["state"][ema.KEY])
  for e, pe, p in zip(_leaves(forked["state"][ema.KEY]), parent_ema,
                      _leaves(forked["state"]["params"])):
    np.testing.assert_allclose(e, 0.1 * pe + 0.9 * p, rtol=2e-5, atol=1e-6)
