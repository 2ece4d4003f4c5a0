"""Metric sinks of the jobs: one JSON line per record, and TensorBoard event files.

TensorBoard files are written with the `tensorboard` package's event writer, which needs no
TensorFlow. Only process 0 writes. A workdir on an object store (gs://) works through
tfusion/paths.py: the JSONL file is rewritten whole from memory (no append there), the event
files are written locally and copied up on flush/close (and at most every `flush_secs`).
"""

import io
import json
import os
import time

import jax

from tfusion import paths


class MetricWriter:
  """Appends {"step", name: value...} to `jsonl_path` and scalars to TensorBoard in `tb_dir`."""

  def __init__(self, jsonl_path, tb_dir=None, *, flush_secs=30.0):
    self._enabled = jax.process_index() == 0
    self._jsonl_path = jsonl_path
    self._tb = self._jsonl = self._tb_mirror = None
    if not self._enabled:
      return
    paths.makedirs(paths.dirname(jsonl_path))
    self._jsonl = paths.JsonlWriter(jsonl_path, flush_secs=flush_secs)
    if tb_dir:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      paths.makedirs(tb_dir)
      if not paths.is_local(tb_dir):  # the event writer needs a file it can append to
        self._tb_mirror = paths.LocalMirror(tb_dir, flush_secs=flush_secs)
      self._tb = EventFileWriter(self._tb_mirror.local_dir if self._tb_mirror else tb_dir)

  def write(self, step, scalars, **extra):
    """Records scalars (numbers) at `step`; `extra` goes to the JSON line only."""
    if not self._enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}, **extra}
    self._jsonl.append(json.dumps(record) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
      if self._tb_mirror is not None and self._tb_mirror.due():  # at most every flush_secs
        self._tb.flush()
        self._tb_mirror.sync()

  def flush(self):
    """Everything written so far reaches the workdir (remote: one rewrite/upload each)."""
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    if self._tb_mirror is not None:
      self._tb_mirror.sync()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._tb_mirror is not None:
      self._tb_mirror.close()
      self._tb_mirror = None


def read_jsonl(path):
  """All records of a metrics file (skipping a torn last line left by a crash)."""
  if not paths.exists(path):
    return []
  out = []
  for line in io.StringIO(paths.read_text(path)):  # lines as a file yields them
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def truncate_after(path, step):
  """Drops the records with "step" > `step` (a resumed run redoes those steps).

  Atomic: the kept lines go to a temporary file that replaces the original (remotely: one
  object write), so a crash leaves either file whole. Process 0 only (the only writer).
  Returns the number dropped.
  """
  if jax.process_index() != 0 or not paths.exists(path):
    return 0
  kept, dropped = [], 0
  for line in io.StringIO(paths.read_text(path)):  # lines as a file yields them
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      dropped += 1  # a torn last line left by a crash
      continue
    if isinstance(record, dict) and record.get("step", 0) > step:
      dropped += 1
    else:
      kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    paths.write_atomic(path, "".join(kept), tmp_suffix=f".tmp-{os.getpid()}")
  return dropped
