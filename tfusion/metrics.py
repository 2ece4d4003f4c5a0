"""Metric sinks of the jobs: one JSON line per record, and TensorBoard event files.

TensorBoard files are written with the `tensorboard` package's event writer, which needs no
TensorFlow. Only process 0 writes.
"""

import json
import os
import time

import jax


class MetricWriter:
  """Appends {"step", name: value...} to `jsonl_path` and scalars to TensorBoard in `tb_dir`."""

  def __init__(self, jsonl_path, tb_dir=None):
    self._enabled = jax.process_index() == 0
    self._jsonl_path = jsonl_path
    self._tb = None
    if not self._enabled:
      return
    os.makedirs(os.path.dirname(jsonl_path), exist_ok=True)
    if tb_dir:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      os.makedirs(tb_dir, exist_ok=True)
      self._tb = EventFileWriter(tb_dir)

  def write(self, step, scalars, **extra):
    """Records scalars (numbers) at `step`; `extra` goes to the JSON line only."""
    if not self._enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}, **extra}
    with open(self._jsonl_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path):
  """All records of a metrics file (skipping a torn last line left by a crash)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def truncate_after(path, step):
  """Drops the records with "step" > `step` (a resumed run redoes those steps).

  Atomic: the kept lines go to a temporary file that replaces the original, so a crash
  leaves either file whole. Process 0 only (the only writer). Returns the number dropped.
  """
  if jax.process_index() != 0 or not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
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
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped
