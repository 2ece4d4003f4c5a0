"""A workdir on gs:// (tfusion/paths.py), offline: epath's gs:// backend swapped for an
in-memory object store with an object store's rules (no append, no directories, an object
appears whole when its upload closes).

Covered: train.jsonl through several flushes and a resume's truncation, the TensorBoard
event file, the best-effort lock (a second holder refused, a racing writer detected), the
job log file, eval.jsonl / eval_state.json / the sample chunk cache, and the data-state
files of checkpoint.py; and (slow) a tiny training run with the workdir on gs:// whose
checkpoint directory alone is local: Orbax writes through TensorStore, which cannot reach
this fake, so Orbax's own gs:// writes are not covered here.
"""

import fnmatch
import io
import json
import logging
import os

import pytest

from etils.epath import backend as epath_backend
from etils.epath import gpath

from tfusion import metrics, paths, workdir_lock

W = "gs://bucket/run"


class ObjectStore(epath_backend.Backend):
  """gs:// in memory: {"bucket/key": bytes}; prefixes stand in for directories."""

  def __init__(self):
    self.objects = {}
    self.uploads = []  # keys, in the order their uploads completed

  @staticmethod
  def key(path):
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return path[len("gs://"):].rstrip("/")

  def put(self, path, data):
    key = self.key(path)
    self.objects[key] = data
    self.uploads.append(key)

  def text(self, path):
    return self.objects[self.key(path)].decode()

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise io.UnsupportedOperation(f"object stores cannot append ({path}, mode {mode!r})")
    key = self.key(path)
    if "r" in mode:
      if key not in self.objects:
        raise FileNotFoundError(path)
      data = self.objects[key]
      return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode())
    store = self

    class Upload(io.BytesIO if "b" in mode else io.StringIO):
      def close(self):  # the object appears now, whole
        if not self.closed:
          value = self.getvalue()
          store.put(path, value if isinstance(value, bytes) else value.encode())
        super().close()
    return Upload()

  def exists(self, path):
    return self.key(path) in self.objects or self.isdir(path)

  def isdir(self, path):
    prefix = self.key(path) + "/"
    return any(k.startswith(prefix) for k in self.objects)

  def listdir(self, path):
    prefix = self.key(path) + "/"
    names = {k[len(prefix):].split("/")[0] for k in self.objects if k.startswith(prefix)}
    if not names:
      raise FileNotFoundError(path)
    return sorted(names)

  def glob(self, path):
    return ["gs://" + k for k in self.objects if fnmatch.fnmatch(k, self.key(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    del top_down, on_error
    dirs, files = [], []
    for name in self.listdir(top):
      (dirs if self.isdir(f"{os.fspath(top)}/{name}") else files).append(name)
    yield os.fspath(top), dirs, files
    for name in dirs:
      yield from self.walk(f"{os.fspath(top)}/{name}")

  def makedirs(self, path, *, exist_ok=False, mode=None):
    pass  # no directories

  def mkdir(self, path, *, exist_ok=False, mode=None):
    pass

  def rmtree(self, path):
    prefix = self.key(path) + "/"
    gone = [k for k in self.objects if k.startswith(prefix)]
    if not gone:
      raise FileNotFoundError(path)
    for k in gone:
      del self.objects[k]

  def remove(self, path):
    if self.objects.pop(self.key(path), None) is None:
      raise FileNotFoundError(path)

  def rename(self, path, dst):
    self.copy(path, dst, overwrite=False)
    self.remove(path)

  def replace(self, path, dst):
    self.copy(path, dst, overwrite=True)
    self.remove(path)

  def copy(self, path, dst, overwrite=False):
    if not overwrite and self.key(dst) in self.objects:
      raise FileExistsError(dst)
    self.put(dst, self.objects[self.key(path)])

  def stat(self, path):
    raise NotImplementedError


@pytest.fixture
def store(monkeypatch, tmp_path):
  """The fake gs://; the working directory is an empty local one, which must stay empty
  (os.makedirs or open on "gs://bucket/..." would create ./gs:/bucket/... there)."""
  fake = ObjectStore()
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fake
  assert not os.listdir(cwd), f"local files made from a URL: {os.listdir(cwd)}"


def steps_of(path):
  return [r["step"] for r in metrics.read_jsonl(path)]


def test_paths_are_urls_not_local_paths():
  assert not paths.is_local(W) and paths.is_local("/tmp/w") and paths.is_local("w")
  assert paths.join(W, "metrics", "train.jsonl") == W + "/metrics/train.jsonl"
  assert paths.absolute(W + "/") == W  # os.path.abspath would make it /cwd/gs:/bucket/run
  from tfusion import checkpoint, fork
  assert checkpoint.checkpoint_dir(W) == W + "/checkpoints"
  assert fork.parse_init_from(W + ":40") == (W, 40)
  assert fork.parse_init_from(W) == (W, None)


def test_train_jsonl_flushes_and_resume_truncation(store):
  path = paths.join(W, "metrics", "train.jsonl")
  writer = metrics.MetricWriter(path, paths.join(W, "tb"), flush_secs=3600)
  writer.write(1, {"loss": 1.0})  # the first record is uploaded at once
  assert steps_of(path) == [1]
  for step in (2, 3):
    writer.write(step, {"loss": 1.0 / step})
  assert steps_of(path) == [1]  # rewrites wait for flush_secs or flush()
  writer.flush()
  assert steps_of(path) == [1, 2, 3]
  for step in (4, 5, 6):
    writer.write(step, {"loss": 1.0 / step})
  writer.flush()
  assert steps_of(path) == [1, 2, 3, 4, 5, 6]
  writer.write(7, {"loss": 0.1})
  writer.close()  # close uploads what is left
  assert steps_of(path) == [1, 2, 3, 4, 5, 6, 7]
  assert store.uploads.count(store.key(path)) == 4  # whole rewrites, one per flush

  events = [k for k in store.objects if k.startswith("bucket/run/tb/events.out.tfevents.")]
  assert len(events) == 1 and b"loss" in store.objects[events[0]]

  # A resume from step 4: the records of the steps it redoes go, in one object write.
  assert metrics.truncate_after(path, 4) == 3
  assert steps_of(path) == [1, 2, 3, 4]
  resumed = metrics.MetricWriter(path, None, flush_secs=3600)
  for step in (5, 6):
    resumed.write(step, {"loss": 2.0})
  resumed.close()
  records = metrics.read_jsonl(path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # earlier runs' lines kept
  assert [r["loss"] for r in records[-2:]] == [2.0, 2.0]
  assert store.text(path).endswith("\n") and store.text(path).count("\n") == 6


def test_lock_refuses_a_second_holder(store, monkeypatch):
  monkeypatch.setattr(workdir_lock, "_settle", lambda seconds: None)
  with workdir_lock.WorkdirLock(W):
    holder = workdir_lock.read_holder(W)
    assert holder["pid"] == os.getpid() and holder["token"]
    with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by"):
      workdir_lock.WorkdirLock(W).acquire()
    assert workdir_lock.read_holder(W) == holder  # the refused one changed nothing
  assert workdir_lock.read_holder(W) is None  # released: the object is gone
  assert "bucket/run/LOCK" not in store.objects


def test_lock_race_the_last_writer_wins(store, monkeypatch):
  """Two starts at once: the other's lock object lands while we wait; we refuse."""
  rival = {"host": "other-host", "pid": 4242, "since": "now", "token": "theirs"}
  monkeypatch.setattr(workdir_lock, "_settle",
                      lambda seconds: store.put(W + "/LOCK", json.dumps(rival).encode()))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="other-host pid 4242"):
    workdir_lock.WorkdirLock(W).acquire()
  assert workdir_lock.read_holder(W) == rival  # theirs: not removed by us


def test_job_log_file_in_the_workdir(store):
  from tfusion import logs
  store.put(W + "/logs/train.log", b"an earlier run's line\n")
  handler = logs.log_to_file(W, "train")
  log = logging.getLogger("tfusion.test_remote_workdir")
  try:
    log.info("first line of this run")  # the first record uploads the file
    assert "first line of this run" in store.text(W + "/logs/train.log")
    log.warning("a later line")  # within flush_secs: still local
  finally:
    logs.remove(handler)  # uploads the rest, deletes the local copy
  text = store.text(W + "/logs/train.log")
  assert text.startswith("an earlier run's line\n")  # a resumed run's log continues
  assert "first line of this run" in text and "a later line" in text
  assert not os.path.exists(handler.baseFilename)


def test_eval_files_in_the_workdir(store, monkeypatch):
  import numpy as np
  from tfusion.evaluate import job, sample_cache, suites

  cache = sample_cache.ChunkCache(W + "/eval_cache/samples/step5-abc")
  cache.put(0, np.arange(6.0).reshape(3, 2))
  assert cache.get(0, 3).tolist() == np.arange(6.0).reshape(3, 2).tolist()
  assert cache.get(3, 3) is None

  monkeypatch.setitem(suites.SUITES, "fake", lambda ctx: {"score": 0.5})
  ctx = suites.EvalContext(None, None, 5, W)
  writer = metrics.MetricWriter(W + "/metrics/eval.jsonl", W + "/tb/eval")
  done = job.load_done(W)
  assert done == {}
  job.run_suites(ctx, ["fake"], train_flops=1.0, done=done, writer=writer)
  records = metrics.read_jsonl(W + "/metrics/eval.jsonl")
  assert [(r["step"], r["suite"], r["score"]) for r in records] == [(5, "fake", 0.5)]
  assert json.loads(store.text(W + "/metrics/eval_state.json")) == {"done": {"5": ["fake"]}}
  assert job.load_done(W) == {5: {"fake"}}
  assert not any(k.startswith("bucket/run/eval_cache/samples/step5-") for k in store.objects)
  writer.close()


def test_checkpoint_data_states_on_gs(store):
  from tfusion import checkpoint
  directory = W + "/checkpoints/4/data_states"

  class Args:
    state = {"step": 4}
  checkpoint.DataStatesHandler().save(paths.as_path(directory), Args())
  assert store.text(directory + "/process_0-of-1.json") == json.dumps({"step": 4})
  assert checkpoint.read_data_state(directory, where=directory) == {"step": 4}
  assert checkpoint.read_data_state(directory, where=directory, process_index=1,
                                    process_count=2) == {"step": 4}  # one saver: everyone's
  paths.move(W + "/checkpoints/4", W + "/checkpoints/corrupt-4-0")  # _set_aside
  assert not paths.exists(directory)
  assert paths.listdir(W + "/checkpoints") == ["corrupt-4-0"]


@pytest.mark.slow
def test_tiny_run_with_a_gs_workdir(store, monkeypatch, tmp_path):
  """Two tiny runs in gs://bucket/run (Orbax's directory local: see the module docstring);
  the second resumes from step 2 of 4 (step 4 removed) and redoes steps 3, 4."""
  import shutil
  import train_utils
  from tfusion import checkpoint, train

  local_ckpt = str(tmp_path / "checkpoints")
  monkeypatch.setattr(checkpoint, "checkpoint_dir",
                      lambda workdir: local_ckpt if workdir == W else paths.join(workdir, "c"))
  monkeypatch.setattr(workdir_lock, "_settle", lambda seconds: None)
  config = train_utils.tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 2,
                                      "checkpoint.async_save": False})
  with train_utils.compiled_steps_reused():
    assert train.train_and_evaluate(config, W)["step"] == 4
    jsonl = W + "/metrics/train.jsonl"
    assert steps_of(jsonl) == [1, 2, 3, 4]
    assert json.loads(store.text(W + "/config.json"))["train"]["steps"] == 4
    assert "resumed" not in store.text(W + "/logs/train.log")
    assert any(k.startswith("bucket/run/tb/events.out.tfevents.") for k in store.objects)
    assert "bucket/run/LOCK" not in store.objects  # released
    first = {r["step"]: r["loss"] for r in metrics.read_jsonl(jsonl)}

    shutil.rmtree(os.path.join(local_ckpt, "4"))
    train.train_and_evaluate(config, W)
  records = metrics.read_jsonl(jsonl)
  assert [r["step"] for r in records] == [1, 2, 3, 4]  # 3, 4 dropped, then redone
  assert {r["step"]: r["loss"] for r in records} == pytest.approx(first)
  assert "resumed from" in store.text(W + "/logs/train.log")
  assert "bucket/run/LOCK" not in store.objects
