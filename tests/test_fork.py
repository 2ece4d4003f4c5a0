"""Forks for ablations: --init_from W1[:STEP] with --init_what params | params+opt | all,
lineage in W2/config.json and the first log lines, schedule branches (continue, cool-down),
and the parent never written to."""

import json
import os

import jax
import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, configlib, optim, train, train_state, sharding

TOTAL = 6


@pytest.fixture(scope="module", autouse=True)
def _reuse_compiled_steps():
  with train_utils.compiled_steps_reused():
    yield


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
  """A tiny run of 6 steps (8 devices) with checkpoints at 2, 4, 6, and its digest."""
  workdir = train_utils.shared_tiny_run(tmp_path_factory, steps=TOTAL, every=2)
  return workdir, train_utils.tree_digest(workdir)


def _config(**overrides):
  return train_utils.tiny_config(**{"train.steps": TOTAL, "checkpoint.every_steps": 2,
                                    **overrides})


def _full_state(workdir, config):
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  step, state, _ = ckpt.restore_latest(train_state.abstract_state(config, mesh))
  return step, jax.tree.map(np.asarray, state)


def _lineage(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["lineage"]


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_params_and_params_opt_forks_take_what_they_say(parent, tmp_path, caplog):
  w1, digest = parent
  config = _config(**{"train.steps": 0})  # no training step: the fork's state as it starts
  w2, w3 = str(tmp_path / "params"), str(tmp_path / "params_opt")
  assert train.train_and_evaluate(config, w2, init_from=f"{w1}:4")["step"] == 0
  parent4 = checkpoint.Checkpointer(w1, read_only=True).restore(
      4, train_state.abstract_state(config, sharding.make_mesh(config.mesh)))["state"]
  step, s2 = _full_state(w2, config)
  assert step == 0 and int(s2["step"]) == 0
  _assert_trees_equal(s2["params"], jax.tree.map(np.asarray, parent4["params"]))
  assert all(not x.any() for x in jax.tree.leaves(s2["opt_state"]))  # fresh: zeros
  lineage = _lineage(w2)
  assert lineage["parent_workdir"] == os.path.abspath(w1) and lineage["parent_step"] == 4
  assert lineage["init_what"] == "params"
  assert lineage["config_diff"] == ["train.steps: parent 6, this run 0"]
  stored = checkpoint.Checkpointer(w2, read_only=True).restore_config(0)
  assert stored["lineage"] == lineage  # checkpoints carry it too

  train.train_and_evaluate(config, w3, init_from=w1, init_what="params+opt")  # newest: 6
  _, s3 = _full_state(w3, config)
  _, s6 = _full_state(w1, config)
  _assert_trees_equal(s3["params"], s6["params"])
  adam, masked, schedule = s3["opt_state"][1]
  _assert_trees_equal(adam, s6["opt_state"][1][0])  # moments and Adam's count (6) kept
  assert int(adam.count) == 6 and int(schedule.count) == 0 and int(s3["step"]) == 0
  assert _lineage(w3)["parent_step"] == 6

  with caplog.at_level("WARNING"):  # W2 has checkpoints of its own now: they win
    train.train_and_evaluate(config, w2, init_from=f"{w1}:2")
  assert "has checkpoints of its own" in caplog.text
  assert _lineage(w2)["parent_step"] == 4  # the lineage is the first fork's
  assert train_utils.tree_digest(w1) == digest


def test_all_fork_continues_the_parent_exactly(parent, tmp_path):
  w1, digest = parent
  w2 = str(tmp_path / "all")
  out = train.train_and_evaluate(_config(), w2, init_from=f"{w1}:4", init_what="all")
  assert out["step"] == TOTAL
  for a, b in zip(train_utils.final_params(w1)[1], train_utils.final_params(w2)[1]):
    np.testing.assert_array_equal(a, b)  # params, optimizer, step and data position taken
  mine, theirs = train_utils.losses_by_step(w2), train_utils.losses_by_step(w1)
  assert sorted(mine) == [5, 6] and all(mine[s] == theirs[s] for s in (5, 6))
  assert _lineage(w2)["init_what"] == "all" and _lineage(w2)["config_diff"] == []
  assert train_utils.tree_digest(w1) == digest


def _lrs(workdir):
  from tfusion import metrics
  path = os.path.join(workdir, "metrics", "train.jsonl")
  return {r["step"]: r["lr"] for r in metrics.read_jsonl(path)}


def _check_cooldown_branch(w1, w2, log):
  assert f"forked from {os.path.abspath(w1)} step 4 (init_what=params+opt)" in log
  assert "optim.cooldown_steps: parent 0, this run 2" in log
  with open(os.path.join(w2, "logs", "train.log")) as f:
    assert "forked from" in f.readline()  # the first log line
  lineage = _lineage(w2)
  assert lineage["init_what"] == "params+opt" and lineage["parent_step"] == 4
  assert "optim.schedule_offset: parent 0, this run 4" in lineage["config_diff"]
  # Record k holds the lr of step k-1: the branch starts at the parent's lr at step 4 and
  # decays linearly to end_lr (1e-4) over 2 steps.
  lr, parent_lr = _lrs(w2), _lrs(w1)
  np.testing.assert_allclose(lr[1], parent_lr[5], rtol=1e-6)
  np.testing.assert_allclose([lr[1], lr[2], lr[3]], [4e-4, 2.5e-4, 1e-4], rtol=1e-5)


def test_cooldown_branch(parent, tmp_path, caplog):
  w1, digest = parent
  w2 = str(tmp_path / "cooldown")
  config = _config(**{"train.steps": 3, "optim.schedule_offset": 4, "optim.cooldown_steps": 2})
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, w2, init_from=f"{w1}:4", init_what="params+opt")
  _check_cooldown_branch(w1, w2, caplog.text)
  assert train_utils.tree_digest(w1) == digest


@pytest.mark.slow
def test_cooldown_branch_from_the_command_line(parent, tmp_path):
  w1, digest = parent
  w2 = str(tmp_path / "cooldown")
  proc = train_utils.run_train(
      w2, f"--init_from={w1}:4", "--init_what=params+opt", "--config.train.steps=3",
      "--config.optim.schedule_offset=4", "--config.optim.cooldown_steps=2")
  _check_cooldown_branch(w1, w2, proc.stderr)
  assert train_utils.tree_digest(w1) == digest


def test_schedule_offset_and_cooldown_shapes():
  c = configlib.base_config().optim
  c.lr, c.end_lr, c.warmup_steps, c.decay_steps = 1e-3, 1e-4, 10, 1000
  base = optim.learning_rate_schedule(c)
  c.schedule_offset = 500
  shifted = optim.learning_rate_schedule(c)
  np.testing.assert_allclose(shifted(7), base(507), rtol=1e-6)  # continues the parent
  c.cooldown_steps, c.cooldown_start = 4, 2
  for shape, left in (("linear", 0.75), ("cosine", 0.5 * (1 + np.cos(np.pi / 4)))):
    c.cooldown_shape = shape
    s = optim.learning_rate_schedule(c)
    start = float(base(502))
    np.testing.assert_allclose(s(1), base(501), rtol=1e-6)  # before the cool-down
    np.testing.assert_allclose(s(2), start, rtol=1e-6)
    np.testing.assert_allclose(s(3), 1e-4 + (start - 1e-4) * left, rtol=1e-5)
    np.testing.assert_allclose([s(6), s(50)], [1e-4, 1e-4], rtol=1e-6)


def test_forks_that_cannot_work_stop_before_writing(parent, tmp_path):
  w1, digest = parent
  w2 = str(tmp_path / "w2")
  other_opt = _config(**{"optim.decay_norms_and_embeddings": True})
  with pytest.raises(checkpoint.CheckpointStructureError, match="inner_state"):
    train.train_and_evaluate(other_opt, w2, init_from=w1, init_what="params+opt")
  with pytest.raises(FileNotFoundError, match="no checkpoint 5"):
    train.train_and_evaluate(_config(), w2, init_from=f"{w1}:5")
  with pytest.raises(train.ConfigMismatchError, match="config.model.d_model"):
    train.train_and_evaluate(_config(**{"model.d_model": 48}), w2, init_from=w1)
  with pytest.raises(ValueError, match="own workdir"):
    train.train_and_evaluate(_config(), w1, init_from=w1)
  assert not os.path.exists(w2)
  assert train_utils.tree_digest(w1) == digest
