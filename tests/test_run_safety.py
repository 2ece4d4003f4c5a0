"""Run safety: restore tells damage from difference, one trainer per workdir, Ctrl-C saves,
resumed runs leave no duplicate metric rows, our warnings reach the console and W/logs/."""

import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, metrics, sharding, train, train_state, workdir_lock

TOTAL = 6


@pytest.fixture(scope="module", autouse=True)
def _reuse_compiled_steps():
  with train_utils.compiled_steps_reused():
    yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A straight tiny run of 6 steps (8 devices) with checkpoints at 2, 4, 6 (read only)."""
  return train_utils.shared_tiny_run(tmp_path_factory, steps=TOTAL, every=2)


def _config(**overrides):
  return train_utils.tiny_config(**{"train.steps": TOTAL, "checkpoint.every_steps": 2,
                                    **overrides})


def _copy(base, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(base, dst)
  return dst


def _steps_logged(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, "metrics", "train.jsonl"))
  return [r["step"] for r in records]


def test_changed_optimizer_structure_refuses_then_params_only_continues(base, tmp_path):
  workdir = _copy(base, tmp_path)
  before = train_utils.tree_digest(workdir)
  config = _config(**{"train.steps": TOTAL + 1, "optim.decay_norms_and_embeddings": True})
  with pytest.raises(checkpoint.CheckpointStructureError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert "opt_state/1/1/inner_state" in message  # the masked weight decay's state
  assert "optim.decay_norms_and_embeddings: checkpoint False, config True" in message
  assert "--config.train.restore=params_only" in message
  assert train_utils.tree_digest(workdir) == before  # nothing set aside, no lock left
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]

  config.train.restore = "params_only"
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == TOTAL + 1  # continued from the newest step, 6
  assert _steps_logged(workdir) == list(range(1, TOTAL + 2))
  # Step 7 started from step 6's params with a fresh Adam state: its first update moves
  # each weight by about the lr (6e-4 at step 6), as only a fresh state does.
  _, p6 = train_utils.final_params(base)
  _, p7 = train_utils.final_params(workdir)
  big = max(range(len(p6)), key=lambda i: p6[i].size)
  np.testing.assert_allclose(np.median(np.abs(p7[big] - p6[big])), 6e-4, rtol=0.1)


def test_missing_metadata_is_damage_set_aside_with_a_warning(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  os.remove(os.path.join(workdir, "checkpoints", "6", "state", "_METADATA"))
  config = _config()
  abstract = train_state.abstract_state(config, sharding.make_mesh(config.mesh))
  ckpt = checkpoint.Checkpointer(workdir)
  with caplog.at_level("WARNING"):
    step, state, data_state = ckpt.restore_latest(abstract)
  ckpt.close()
  assert any("checkpoints/6 cannot be restored" in r.getMessage() for r in caplog.records)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("corrupt-6-") for n in names) and "4" in names
  assert step == 4 and int(state["step"]) == 4 and data_state


def test_corrupted_newest_checkpoint_is_announced_on_the_console(base, tmp_path):
  workdir = _copy(base, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "6", "state")
  for root, _, files in os.walk(latest):
    for name in files:
      if name != "_METADATA":  # the tree still reads: the array files are what is damaged
        with open(os.path.join(root, name), "wb"):
          pass
  proc = train_utils.run_train(workdir, f"--config.train.steps={TOTAL}",
                               "--config.checkpoint.every_steps=2")
  assert "checkpoints/6 cannot be restored" in proc.stderr, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr and "checkpoints/4" in proc.stderr
  assert "Given directory" not in proc.stderr  # Orbax's absl chatter stays quiet
  with open(os.path.join(workdir, "logs", "train.log"), encoding="utf-8") as f:
    log = f.read()
  assert "checkpoints/6 cannot be restored" in log and "resumed from" in log
  # Steps 5 and 6 were redone: their old rows are gone, not duplicated.
  assert _steps_logged(workdir) == list(range(1, TOTAL + 1))
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


def test_ctrl_c_saves_and_the_resumed_run_is_bitwise_the_straight_one(base, tmp_path):
  workdir = str(tmp_path / "w")

  def interrupt_at_3(step, scalars):
    del scalars
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  before = signal.getsignal(signal.SIGINT)
  out = train.train_and_evaluate(_config(**{"checkpoint.every_steps": 100}), workdir,
                                 on_log=interrupt_at_3)
  assert out["stop_reason"] == "interrupted" and out["step"] == 3
  assert signal.getsignal(signal.SIGINT) is before  # handlers restored
  assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == [3]
  assert not os.path.exists(os.path.join(workdir, "LOCK"))
  train.train_and_evaluate(_config(**{"checkpoint.every_steps": 100}), workdir)
  for a, b in zip(train_utils.final_params(base)[1], train_utils.final_params(workdir)[1]):
    np.testing.assert_array_equal(a, b)
  straight, resumed = train_utils.losses_by_step(base), train_utils.losses_by_step(workdir)
  assert all(straight[s] == resumed[s] for s in range(1, TOTAL + 1))
  assert _steps_logged(workdir) == list(range(1, TOTAL + 1))


def test_second_ctrl_c_aborts_at_once():
  signals = train._StopSignals()
  before = signal.getsignal(signal.SIGINT)
  signals.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint and a stop
    assert signals.reason == "interrupted"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    signals.restore()
  assert signal.getsignal(signal.SIGINT) is before


def test_a_live_run_refuses_a_second_trainer_before_it_writes(base, tmp_path, monkeypatch):
  workdir = _copy(base, tmp_path)
  with workdir_lock.WorkdirLock(workdir):  # as if a live run (this process) held it
    before = train_utils.tree_digest(workdir)
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=f"in use by host {socket.gethostname()} pid {os.getpid()} since"):
      train.train_and_evaluate(_config(**{"train.steps": TOTAL + 2}), workdir)
    assert train_utils.tree_digest(workdir) == before
  # An aborted run (here: Ctrl-C twice right after it took the lock) leaves no lock behind.
  monkeypatch.setattr(train, "_train", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(**{"train.steps": TOTAL + 2}), workdir)
  assert not os.path.exists(os.path.join(workdir, "LOCK"))


@pytest.mark.slow
def test_second_trainer_is_refused_while_the_first_finishes_untouched(tmp_path):
  workdir = str(tmp_path / "w")
  first = train_utils.start_train(workdir, "--config.train.steps=100000",
                                  "--config.checkpoint.every_steps=4")
  try:
    train_utils.wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "4")),
                         what="checkpoint 4", proc=first)
    lock = os.path.join(workdir, "LOCK")
    holder = workdir_lock.read_holder(workdir)
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = train_utils.run_train(workdir, "--config.train.steps=3", check=False)
    assert second.returncode == 2
    error = [line for line in second.stderr.splitlines() if "tfusion-train: error" in line]
    assert len(error) == 1 and f"pid {first.pid} since {holder['since']}" in error[0]
    assert workdir_lock.read_holder(workdir) == holder
    with open(os.path.join(workdir, "config.json")) as f:  # the first run's, not rewritten
      assert json.load(f)["train"]["steps"] == 100000
    first.send_signal(signal.SIGTERM)  # the first run ends normally, by preemption
    _, err = first.communicate(timeout=120)
  finally:
    if first.poll() is None:
      first.kill()
  assert first.returncode == 0, err[-3000:]
  assert "SIGTERM received" in err
  steps = _steps_logged(workdir)
  assert steps == list(range(1, len(steps) + 1))  # one row per step: no second writer
  saved = checkpoint.Checkpointer(workdir, read_only=True).all_steps()
  assert saved[-1] == len(steps)
  assert not os.path.exists(lock)


def test_lock_stale_foreign_and_forced(tmp_path, monkeypatch):
  monkeypatch.delenv("SLURM_JOB_ID", raising=False)
  workdir = str(tmp_path)
  dead = {"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": "2020-01-01T00:00"}
  with open(os.path.join(workdir, "LOCK"), "w") as f:
    json.dump(dead, f)
  with workdir_lock.WorkdirLock(workdir):  # dead pid on this host: stale, taken over
    assert workdir_lock.read_holder(workdir)["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(workdir).acquire()  # a live holder: refused
  assert workdir_lock.read_holder(workdir) is None  # released
  foreign = dict(dead, host="another-host")  # cannot tell: refused unless forced
  with open(os.path.join(workdir, "LOCK"), "w") as f:
    json.dump(foreign, f)
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host another-host"):
    workdir_lock.WorkdirLock(workdir).acquire()
  with workdir_lock.WorkdirLock(workdir, force=True):
    assert workdir_lock.read_holder(workdir)["host"] == socket.gethostname()
  assert workdir_lock.read_holder(workdir) is None
  # A requeued SLURM job (same job id, maybe another node) takes over its earlier run's lock.
  with open(os.path.join(workdir, "LOCK"), "w") as f:
    json.dump(dict(foreign, slurm_job="77"), f)
  monkeypatch.setenv("SLURM_JOB_ID", "78")
  with pytest.raises(workdir_lock.WorkdirLockedError):
    workdir_lock.WorkdirLock(workdir).acquire()
  monkeypatch.setenv("SLURM_JOB_ID", "77")
  with workdir_lock.WorkdirLock(workdir):
    assert workdir_lock.read_holder(workdir)["slurm_job"] == "77"


def test_truncate_after_keeps_earlier_rows_atomically(tmp_path):
  path = str(tmp_path / "train.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7))
    f.write('{"step": 7, "lo')  # torn by a crash
  assert metrics.truncate_after(path, 4) == 3
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3, 4]
  assert os.listdir(tmp_path) == ["train.jsonl"]  # the temporary file was renamed over it
  assert metrics.truncate_after(path, 4) == 0


def test_skipped_record_counters_reach_train_jsonl_and_the_log(tmp_path, caplog):
  from tfusion.data import records, samples
  tok = samples.sample_tokenizer(str(tmp_path), vocab_size=400,
                                 texts=[(str(i), samples.caption_for(i)) for i in range(100)])
  path = str(tmp_path / "images.array_record")
  rng = np.random.default_rng(0)
  with records.RecordWriter(path) as w:
    for i in range(12):
      if i in (3, 7):
        w.write(b"\xc1 this is not msgpack")
      w.write(records.image_caption_record(rng.standard_normal((4, 4, 4)).astype(np.float16),
                                           samples.caption_for(i)))
  config = train_utils.tiny_config(**{
      "train.steps": 1, "checkpoint.every_steps": 100, "model.vocab_size": 512,
      "data.source": "grain", "data.tokenizer": tok.source, "data.image_caption": path,
      "data.on_bad_record": "skip", "data.prefetch": 0})
  workdir = str(tmp_path / "w")
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, workdir)
  last = metrics.read_jsonl(os.path.join(workdir, "metrics", "train.jsonl"))[-1]
  assert last["data/skipped_records"] >= 2 and last["data/skipped_records"] % 2 == 0
  assert last["data/skipped_undecodable"] == last["data/skipped_records"]
  assert last["data/skipped_source_image_caption"] == last["data/skipped_records"]
  assert f"skipped {int(last['data/skipped_records'])} bad records so far" in caplog.text
  assert "source_image_caption" in caplog.text and "undecodable" in caplog.text
