"""Workdir paths: local directories and object-store URLs (gs://...) through one abstraction.

Every file a job keeps in a workdir goes through these functions (never `os.path` or `open` on
a workdir path): a local path is handled with `os` exactly as before, a URL ("gs://bucket/w",
also s3://, az://) through etils.epath, the path layer Orbax itself uses (and which reaches
GCS through TensorFlow's gfile or fsspec/gcsfs, whichever is installed). Object stores differ
from a file system in ways that matter to the writers:

* no append: `JsonlWriter` keeps a remote file's lines in memory and rewrites the whole object
  (at most every `flush_secs`, and on flush/close); a local file is appended to at once;
* no rename: `write_atomic` writes a temporary file and renames it locally; remotely a single
  object write is already atomic (readers see the old object or the new one);
* writers that need a real file (logging's FileHandler, TensorBoard's event writer) write into
  a `LocalMirror`: a local temporary directory whose files are copied to the workdir;
* no exclusive create: tfusion/workdir_lock.py takes a best-effort lock on remote workdirs.

Paths are passed around as strings (`join` and `absolute` return strings), so messages and
stored configs show what the user typed.
"""

import io
import os
import re
import shutil
import tempfile
import time

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_local(path):
  """True for a local file system path, False for a URL (gs://bucket/...)."""
  return not _URL.match(os.fspath(path))


def as_path(path):
  """`path` (str or PathLike) as an epath.Path (gs:// paths get epath's GCS backend)."""
  return epath.Path(path)


def join(path, *parts):
  """`path`/`parts` as a string (os.path.join locally; '/'-joined for URLs)."""
  if is_local(path):
    return os.path.join(path, *parts)
  return os.fspath(as_path(path).joinpath(*parts))


def absolute(path):
  """An absolute local path (os.path.abspath), or the URL as it is (already absolute)."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else os.fspath(as_path(path))


def dirname(path):
  """The parent directory, as a string."""
  if is_local(path):
    return os.path.dirname(path)
  return os.fspath(as_path(path).parent)


def exists(path):
  return as_path(path).exists()


def isdir(path):
  """A local directory; remotely: objects exist under this prefix."""
  return as_path(path).is_dir()


def listdir(path):
  """The names (not paths) directly under `path`, sorted."""
  return sorted(p.name for p in as_path(path).iterdir())


def makedirs(path):
  """mkdir -p (object stores have no directories: a no-op or a marker, per backend)."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  else:
    as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path):
  """The file's text; FileNotFoundError when missing."""
  if is_local(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  return as_path(path).read_text()


def read_bytes(path):
  if is_local(path):
    with open(path, "rb") as f:
      return f.read()
  return as_path(path).read_bytes()


def write_text(path, text):
  """Writes `text` (a crash may leave a local file half-written; see write_atomic)."""
  if is_local(path):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    as_path(path).write_text(text)


def write_atomic(path, data, *, tmp_suffix=".tmp"):
  """Writes `data` (str or bytes) so that readers see the old file or the new one, whole.

  Locally: a temporary file `path + tmp_suffix` renamed over `path`; remotely one object
  write (object stores publish an object only once its upload completed)."""
  binary = isinstance(data, bytes)
  if not is_local(path):
    if binary:
      as_path(path).write_bytes(data)
    else:
      as_path(path).write_text(data)
    return
  tmp = path + tmp_suffix
  with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
    f.write(data)
  os.replace(tmp, path)


def remove(path):
  """Deletes a file; a missing one is fine."""
  if is_local(path):
    try:
      os.remove(path)
    except FileNotFoundError:
      pass
  else:
    as_path(path).unlink(missing_ok=True)


def rmtree(path):
  """Deletes a directory tree (or every object under a prefix); a missing one is fine."""
  if is_local(path):
    shutil.rmtree(path, ignore_errors=True)
  elif isdir(path):
    as_path(path).rmtree(missing_ok=True)


def move(src, dst):
  """Renames a file or directory. Remotely a copy of every object, then a delete (object
  stores have no rename): not atomic, which is fine for setting damage aside."""
  if is_local(src):
    os.rename(src, dst)
    return
  source = as_path(src)
  if not source.is_dir():
    source.rename(dst)
    return
  _copy_tree(source, as_path(dst))
  source.rmtree()


def _copy_tree(src, dst):
  for child in src.iterdir():  # iterdir joins names to `src`: URLs keep their scheme
    if child.is_dir():
      _copy_tree(child, dst / child.name)
    else:
      child.copy(dst / child.name, overwrite=True)


def save_npy(path, array):
  """np.save of `array`, atomically (write_atomic)."""
  import numpy as np
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_atomic(path, buffer.getvalue(), tmp_suffix=".tmp.npy")


def load_npy(path):
  import numpy as np
  if is_local(path):
    return np.load(path)
  return np.load(io.BytesIO(read_bytes(path)))


class JsonlWriter:
  """Adds lines to a JSONL file.

  Local: each line is appended at once (as it always was: a crash leaves at most a torn last
  line, which the readers skip). Remote: object stores cannot append, so the writer holds the
  file's lines in memory (those earlier runs left, read once at the start) and rewrites the
  whole object on the first line, then at most every `flush_secs`, and on flush()/close().
  A crash loses the lines since the last rewrite; the trainer flushes before each checkpoint
  save, so every record up to a checkpoint it can resume from is kept. One writer per file.
  """

  def __init__(self, path, *, flush_secs=30.0):
    self.path = path
    self.local = is_local(path)
    self.flush_secs = flush_secs
    self._lines, self._dirty, self._last = [], False, None
    if not self.local and exists(path):
      text = read_text(path)
      self._lines = [text if text.endswith("\n") else text + "\n"] if text else []

  def append(self, line):
    """Adds `line` (ending in a newline)."""
    if self.local:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
      return
    self._lines.append(line)
    self._dirty = True
    if self._last is None or time.monotonic() - self._last >= self.flush_secs:
      self.flush()

  def flush(self):
    if self.local or not self._dirty:
      return
    text = "".join(self._lines)
    self._lines = [text]  # one string: the next rewrite does not join thousands again
    write_text(self.path, text)
    self._dirty, self._last = False, time.monotonic()

  def close(self):
    self.flush()


class LocalMirror:
  """A local temporary directory whose files are copied into `remote_dir`.

  For writers that need a real file (logging.FileHandler, TensorBoard's event writer) on a
  remote workdir. sync() uploads each file that changed since its last upload, whole (object
  stores cannot append); callers sync when due() (every `flush_secs`). close() syncs and
  deletes the temporary directory. Flat: files directly in the directory only.
  """

  def __init__(self, remote_dir, *, flush_secs=30.0):
    self.remote_dir = remote_dir
    self.local_dir = tempfile.mkdtemp(prefix="tfusion-mirror-")
    self.flush_secs = flush_secs
    self._uploaded = {}  # name -> (size, mtime) at its last upload
    self._last = None
    self._syncing = False  # an upload that logs must not start another (logs.py)

  def fetch(self, name):
    """Copies remote_dir/name (if it exists) into the local directory; returns the local path
    (so a writer that appends continues the remote file)."""
    local = os.path.join(self.local_dir, name)
    remote = join(self.remote_dir, name)
    if exists(remote):
      with open(local, "wb") as f:
        f.write(read_bytes(remote))
      st = os.stat(local)
      self._uploaded[name] = (st.st_size, st.st_mtime_ns)
    return local

  def due(self):
    """True when `flush_secs` passed since the last sync (or none happened yet)."""
    return self._last is None or time.monotonic() - self._last >= self.flush_secs

  def sync(self):
    """Uploads the files that changed since their last upload."""
    if self._syncing or self.local_dir is None:
      return
    self._syncing, self._last = True, time.monotonic()
    try:
      for name in sorted(os.listdir(self.local_dir)):
        local = os.path.join(self.local_dir, name)
        st = os.stat(local)
        if self._uploaded.get(name) == (st.st_size, st.st_mtime_ns):
          continue
        with open(local, "rb") as f:
          data = f.read()
        write_atomic(join(self.remote_dir, name), data)
        self._uploaded[name] = (st.st_size, st.st_mtime_ns)
    finally:
      self._syncing = False

  def close(self):
    if self.local_dir is None:
      return
    self.sync()
    shutil.rmtree(self.local_dir, ignore_errors=True)
    self.local_dir = None
