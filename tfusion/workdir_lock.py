"""One trainer per workdir: W/LOCK (JSON: host, pid, since) held for the whole run.

Two trainers on one workdir would interleave checkpoints and metrics and destroy both runs,
so the second one refuses before writing anything, naming the holder. The lock is created
atomically (O_EXCL) by process 0; the other processes learn the outcome from a broadcast,
so all of them refuse or proceed together. A lock whose pid is dead on this same host is
stale (a crash, a SIGKILL) and is taken over with a warning, and so is one left by an earlier
run of this same SLURM job (a requeued job keeps its id and starts only after the old one
ended, possibly on another node); any other lock from another host cannot be checked from
here: `--force_unlock` takes it over once you know that run is gone.

On a remote workdir (gs://, tfusion/paths.py) there is no exclusive create through epath, so
the lock is best-effort: process 0 writes the lock object with a unique token, waits
`SETTLE_SECONDS`, reads it back and refuses if another token is there (the last writer of a
race wins, the others see its token). Two starts whose read-write gaps both fit inside that
wait can still both proceed; an exact lock would need GCS generation preconditions, which
epath does not expose. It guards against the usual mistake (a second run started on a live
workdir), not against two starts in the same second.
"""

import datetime
import json
import logging
import os
import socket
import time
import uuid

import jax

from tfusion import paths

LOCK_FILE = "LOCK"
SETTLE_SECONDS = 2.0  # remote: how long a racing writer has to overwrite our lock object


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir (the message is one line naming it)."""


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


def read_holder(workdir):
  """The lock's content as a dict, or None when there is no (readable) lock."""
  try:
    return json.loads(paths.read_text(paths.join(workdir, LOCK_FILE)) or "{}")
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}  # torn or unreadable: treated as held by an unknown run


def describe(holder):
  return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
          f"since {holder.get('since', '?')}")


def _settle(seconds):
  time.sleep(seconds)


class WorkdirLock:
  """Context manager: `with WorkdirLock(workdir, force=False): train...`."""

  def __init__(self, workdir, *, force=False):
    self.workdir = workdir
    self.path = paths.join(workdir, LOCK_FILE)
    self.force = force
    self.mine = None  # what process 0 wrote (to release only our own lock)

  def _stale(self, holder):
    if not holder:
      return False
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job:  # an earlier run of this (requeued) job
      return True
    return (holder.get("host") == socket.gethostname()
            and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]))

  def _try_take(self):
    """Process 0: creates the lock. Returns None, or the live holder that prevents it."""
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if os.environ.get("SLURM_JOB_ID"):
      me["slurm_job"] = os.environ["SLURM_JOB_ID"]
    for _ in range(3):  # a stale lock removed between our attempts: try again
      holder = read_holder(self.workdir)
      if holder is not None:
        if not (self.force or self._stale(holder)):
          return holder
        logging.warning("taking over the lock of %s (%s): %s", self.workdir, describe(holder),
                        "--force_unlock" if self.force else "that process is gone")
        paths.remove(self.path)
      if not paths.is_local(self.path):
        return self._write_and_confirm(me)
      os.makedirs(self.workdir, exist_ok=True)
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(me))
      self.mine = me
      return None
    return read_holder(self.workdir) or {}

  def _write_and_confirm(self, me):
    """Remote (best-effort, see the module docstring): our token is still there after the
    settle time, or we refuse naming whoever overwrote it."""
    me = dict(me, token=uuid.uuid4().hex)
    paths.makedirs(self.workdir)
    paths.write_text(self.path, json.dumps(me))
    _settle(SETTLE_SECONDS)
    holder = read_holder(self.workdir)
    if holder != me:
      return holder or {}
    self.mine = me
    return None

  def acquire(self):
    holder = self._try_take() if jax.process_index() == 0 else None
    if jax.process_count() > 1:  # every process refuses, or none does
      import numpy as np
      from jax.experimental import multihost_utils
      refused = multihost_utils.broadcast_one_to_all(np.int32(holder is not None))
      if int(refused) and holder is None:
        holder = read_holder(self.workdir) or {}
    if holder is not None:
      raise WorkdirLockedError(
          f"workdir {self.workdir} is in use by {describe(holder)} ({self.path}); wait for "
          "that run, use another workdir, or pass --force_unlock if it is gone")
    return self

  def release(self):
    """Removes the lock if it is still ours (process 0)."""
    if self.mine is None:
      return
    if read_holder(self.workdir) == self.mine:
      paths.remove(self.path)
    self.mine = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
