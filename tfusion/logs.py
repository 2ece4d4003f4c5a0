"""Job logging: our warnings and info lines on the console (stderr) and in W/logs/.

Every job (train, eval, generate, precompute) calls `setup_job_logging(workdir, job_name)`:
records of the root logger and of `tfusion.*` loggers at INFO and above go to stderr and to
W/logs/<job>.log (process 0) or W/logs/<job>-<process>.log (the others). Other libraries
speak only at WARNING and above, absl (Orbax, TensorStore speak through it) only at ERROR:
their routine chatter would drown the lines a person needs (checkpoint fell back, resumed
from, skipped records, preemption, non-finite steps).

A job that must not write before its checks pass (tfusion-train: the workdir lock) calls
`setup_console()` early and `log_to_file(...)` once it owns the workdir.

On a remote workdir (gs://, tfusion/paths.py) a FileHandler cannot write to the URL: the
lines go to a local temporary copy of W/logs/<job>.log (started from the remote file, so a
resumed run's log continues it) that is uploaded whole at most every 30 s when a line is
logged, and when the handler is removed or closed (logging closes it at interpreter exit).
A killed process loses the lines since the last upload; the console has them all.
"""

import logging
import os
import sys

from tfusion import paths

_TAG = "_tfusion_handler"
_FORMAT = "%(asctime)s %(levelname).1s %(filename)s:%(lineno)d] %(message)s"


class _OursOrLoud(logging.Filter):
  """Our records from INFO on; other libraries' from WARNING (absl's from ERROR) on."""

  def filter(self, record):
    if record.name == "root" or record.name.startswith("tfusion"):
      return True
    if record.name == "absl" or record.name.startswith(("orbax", "tensorstore")):
      return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING


def _tagged(handler):
  setattr(handler, _TAG, True)
  handler.addFilter(_OursOrLoud())
  handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
  return handler


def setup_console():
  """Routes our INFO+ lines to stderr (once; idempotent) and quiets absl's own handler."""
  root = logging.getLogger()
  try:  # absl.app installs a handler on the root logger that honours --verbosity
    from absl import logging as absl_logging
    root.removeHandler(absl_logging.get_absl_handler())
    absl_logging.get_absl_logger().setLevel(logging.ERROR)
  except ImportError:
    pass
  root.setLevel(logging.INFO)
  if not any(getattr(h, _TAG, False) and isinstance(h, logging.StreamHandler)
             and not isinstance(h, logging.FileHandler) for h in root.handlers):
    root.addHandler(_tagged(logging.StreamHandler(sys.stderr)))


def log_file_path(workdir, job_name, process_index=None):
  """W/logs/<job>.log for process 0, W/logs/<job>-<process>.log for the others."""
  if process_index is None:
    import jax
    process_index = jax.process_index()
  name = job_name if process_index == 0 else f"{job_name}-{process_index}"
  return paths.join(workdir, "logs", name + ".log")


class _MirroredFileHandler(logging.FileHandler):
  """A FileHandler on a local copy of a remote log file (paths.LocalMirror), uploaded when
  due (after a record) and on close."""

  def __init__(self, path, flush_secs=30.0):
    self.mirror = paths.LocalMirror(paths.dirname(path), flush_secs=flush_secs)
    local = self.mirror.fetch(os.path.basename(path))
    super().__init__(local, encoding="utf-8")

  def flush(self):
    super().flush()
    if self.mirror is not None and self.mirror.due():
      self.mirror.sync()

  def close(self):
    super().close()
    if self.mirror is not None:
      mirror, self.mirror = self.mirror, None
      mirror.close()


def log_to_file(workdir, job_name):
  """Appends our INFO+ lines to `log_file_path(...)`. Returns the handler (for `remove`)."""
  path = log_file_path(workdir, job_name)
  paths.makedirs(paths.dirname(path))
  handler = _tagged(logging.FileHandler(path, encoding="utf-8") if paths.is_local(path)
                    else _MirroredFileHandler(path))
  root = logging.getLogger()
  absl = logging.getLogger("absl")
  handler.previous_levels = {root: root.level, absl: absl.level}
  if root.level > logging.INFO:
    root.setLevel(logging.INFO)  # the file gets info lines even where the console does not
    if absl.getEffectiveLevel() < logging.WARNING:  # ... but not Orbax's info chatter
      absl.setLevel(logging.WARNING)
  root.addHandler(handler)
  return handler


def remove(handler):
  """Detaches and closes a handler from `log_to_file` (restoring the levels it changed)."""
  logging.getLogger().removeHandler(handler)
  handler.close()
  for logger, level in getattr(handler, "previous_levels", {}).items():
    logger.setLevel(level)


def setup_job_logging(workdir, job_name):
  """Console and W/logs/ file for a job that may write to `workdir` now. Returns the handler."""
  setup_console()
  return log_to_file(workdir, job_name)
