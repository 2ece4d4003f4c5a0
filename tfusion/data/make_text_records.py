"""`tfusion-make-text-records`: text files -> text-record ArrayRecord shards for config.data.text.

  tfusion-make-text-records --input corpus.txt,more/,web-*.jsonl --out TEXT_RECORDS
      [--text_key text] [--txt_docs blank_line|file] [--shard_size 100000] [--overwrite]
      [--process_index I --process_count N]

Inputs are comma-separated files, directories (their .txt, .jsonl and .parquet files) or
globs, read in sorted order:
  .txt      documents separated by blank lines (the convention of config.eval.ppl_files);
            with --txt_docs=file, each file is one document
  .jsonl    one JSON object per line, its --text_key field (default "text") is the document
  .parquet  the --text_key column, one document per row (needs pyarrow: pip install pyarrow)
Each document becomes one record of kind "text" (tfusion/data/records.py) with an id naming
its file and line (or row). Input file F (in sorted order) is written to shards of
--shard_size records, OUT/text-FFFFF-SSSS.array_record, each appearing under its name only
when complete, then marked done by OUT/text-FFFFF.done.json (its counts). Empty documents,
lines that are not JSON and objects without a string --text_key are skipped, counted by reason
and named (the first few). A file that is not UTF-8 stops the job naming it.

At scale: a rerun resumes (files marked done are kept, a file cut short is written again), and
several hosts share the job by input file (file F on host F % N; --process_index/--process_count,
default jax's when jax.distributed is initialised, else 0 of 1). OUT/text_records.json records
the inputs (names and sizes) and settings; host 0 writes it and the others wait for it. A rerun
with other inputs or settings is refused in one line naming what changed, unless --overwrite
(the old shards are deleted first). Then train with --config.data.text=OUT.
"""

import argparse
import json
import os
import sys
import time

from tfusion.data import records as records_lib

FORMATS = (".txt", ".jsonl", ".parquet")
PREFIX = "text-"
EXAMPLES_PER_REASON = 3
MANIFEST = "text_records.json"
DONE = ".done.json"


def input_files(spec):
  """Comma-separated files, directories or globs -> sorted input files (error names a part)."""
  files = records_lib.resolve_paths(spec, "--input", extensions=FORMATS, what="file")
  for f in files:
    if not f.endswith(FORMATS):
      raise ValueError(f"--input {f}: unknown format (expected {', '.join(FORMATS)})")
  return files


class Skip(Exception):
  """A document that cannot become a record (the message is the reason)."""


def _lines(path):
  """(line number, text) of a UTF-8 file; a non-UTF-8 byte is an error naming the file."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        yield n, raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}: line {n} is not UTF-8 ({e.reason} at byte {e.start})") from None


def txt_documents(path, per_file=False):
  """(id, text) per blank-line separated document (or the whole file with per_file)."""
  if per_file:
    yield path, "".join(line for _, line in _lines(path))
    return
  doc, start = [], None
  for n, line in _lines(path):
    if line.strip():
      doc.append(line)
      start = start or n
    elif doc:
      yield f"{path}:{start}", "".join(doc)
      doc, start = [], None
  if doc:
    yield f"{path}:{start}", "".join(doc)


def jsonl_documents(path, text_key="text"):
  """(id, text or Skip) per non-blank JSONL line."""
  for n, line in _lines(path):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError:
      yield where, Skip("not JSON")
      continue
    text = obj.get(text_key) if isinstance(obj, dict) else None
    yield where, text if isinstance(text, str) else Skip(f"no string {text_key!r} field")


def parquet_documents(path, text_key="text"):
  """(id, text or Skip) per row of the `text_key` column (streamed in batches)."""
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError(f"{path}: reading .parquet needs the pyarrow package "
                     "(pip install pyarrow)") from None
  table = pq.ParquetFile(path)
  columns = table.schema_arrow.names
  if text_key not in columns:
    raise ValueError(f"{path} has no column {text_key!r} (columns: {columns}); set --text_key")
  row = 0
  for batch in table.iter_batches(columns=[text_key]):
    for text in batch.column(0).to_pylist():
      yield f"{path}:row {row}", text if isinstance(text, str) else Skip(
          f"no string {text_key!r} field")
      row += 1


def documents(path, text_key="text", txt_docs="blank_line"):
  if path.endswith(".jsonl"):
    return jsonl_documents(path, text_key)
  if path.endswith(".parquet"):
    return parquet_documents(path, text_key)
  return txt_documents(path, per_file=txt_docs == "file")


def existing_shards(out_dir, file_index=None):
  """Text shards in out_dir (complete or being written); of one input file when given."""
  if not os.path.isdir(out_dir):
    return []
  prefix = PREFIX if file_index is None else f"{PREFIX}{file_index:05d}-"
  return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                if f.startswith(prefix) and f.endswith((records_lib.EXTENSION,
                                                        records_lib.EXTENSION + ".tmp")))


def _done_path(out_dir, file_index):
  return os.path.join(out_dir, f"{PREFIX}{file_index:05d}{DONE}")


def _manifest(files, text_key, txt_docs, shard_size):
  return {"inputs": [[os.path.basename(p), os.path.getsize(p)] for p in files],
          "text_key": text_key, "txt_docs": txt_docs, "shard_size": shard_size}


def _changes(old, new):
  return [k for k in new if old.get(k) != new[k]]


def _read_manifest(out_dir):
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, OSError):
    return {}  # being replaced right now (or damaged): differs from any real manifest


def _refusal(out_dir, what):
  return (f"{out_dir} holds text records of another run ({what}); use --overwrite to replace "
          "them, or another --out")


def prepare_out_dir(out_dir, manifest, overwrite):
  """Process 0: checks OUT against `manifest` (resume when equal), else refuses or, with
  `overwrite`, deletes the old shards and markers; then records the manifest."""
  old = _read_manifest(out_dir)
  shards = existing_shards(out_dir)
  if old == manifest:
    return
  if old is not None or shards:
    if not overwrite:
      what = (f"{', '.join(_changes(old, manifest))} changed" if old
              else f"{len(shards)} text shards ({os.path.basename(shards[0])}, ...)")
      raise ValueError(_refusal(out_dir, what))
    for name in os.listdir(out_dir):
      if name.startswith(PREFIX) or name == MANIFEST:
        os.remove(os.path.join(out_dir, name))
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, MANIFEST)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)


def await_manifest(out_dir, manifest, overwrite, wait_s):
  """Processes other than 0: wait until process 0 has recorded a manifest equal to ours."""
  deadline = time.monotonic() + wait_s
  while True:
    old = _read_manifest(out_dir)
    if old == manifest:
      return
    if old and not overwrite:
      raise ValueError(_refusal(out_dir, f"{', '.join(_changes(old, manifest))} changed"))
    if time.monotonic() > deadline:
      raise ValueError(f"process 0 wrote no matching {MANIFEST} into {out_dir} within "
                       f"{wait_s:.0f} s; start process 0 with the same inputs")
    time.sleep(min(1.0, wait_s / 10))


def _write_file(path, file_index, out_dir, text_key, txt_docs, shard_size, skip, progress):
  """Writes one input file's documents into its shards; returns (written, [shard paths])."""
  for stale in existing_shards(out_dir, file_index):  # a run cut short in this file
    os.remove(stale)
  written, shards, writer = 0, [], None
  try:
    for where, text in documents(path, text_key, txt_docs):
      progress.update(1)
      if isinstance(text, Skip):
        skip(str(text), where)
        continue
      text = text.strip()
      if not text:
        skip("empty document", where)
        continue
      if writer is None:
        writer = records_lib.RecordWriter(os.path.join(
            out_dir, f"{PREFIX}{file_index:05d}-{len(shards):04d}{records_lib.EXTENSION}"))
      writer.write(records_lib.text_record(text, id=where))
      written += 1
      if writer.count == shard_size:
        writer.close()
        shards.append(writer.path)
        writer = None
    if writer is not None:
      writer.close()
      shards.append(writer.path)
      writer = None
  finally:
    if writer is not None:
      writer.abort()  # a failed run leaves complete shards only
  return written, shards


def make_text_records(files, out_dir, *, text_key="text", txt_docs="blank_line",
                      shard_size=100_000, overwrite=False, show_progress=True, process_index=0,
                      process_count=1, manifest_wait_s=600.0):
  """Writes the documents of `files` as text records; returns this process's summary.

  {"written": n, "shards": [paths], "skipped": {reason: n}, "examples": {reason: [ids]},
   "files_done_before": k}; files marked done by an earlier run count with their shards.
  """
  from tqdm import tqdm
  if shard_size < 1:
    raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
  if txt_docs not in ("blank_line", "file"):
    raise ValueError(f"--txt_docs must be blank_line or file, got {txt_docs!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  manifest = _manifest(files, text_key, txt_docs, shard_size)
  if process_index == 0:
    prepare_out_dir(out_dir, manifest, overwrite)
  else:
    await_manifest(out_dir, manifest, overwrite, manifest_wait_s)
  summary = {"written": 0, "shards": [], "skipped": {}, "examples": {}, "files_done_before": 0}

  mine = [(i, p) for i, p in enumerate(files) if i % process_count == process_index]
  # disable=None: a progress bar on a terminal, none in logs.
  with tqdm(unit="doc", disable=None if show_progress else True,
            desc="text records") as progress:
    for i, path in mine:
      done = _done_path(out_dir, i)
      if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
          counts = json.load(f)
        summary["files_done_before"] += 1
      else:
        skipped = {}  # reason -> [where]
        written, shards = _write_file(
            path, i, out_dir, text_key, txt_docs, shard_size,
            lambda reason, where: skipped.setdefault(reason, []).append(where), progress)
        counts = {"written": written, "shards": [os.path.basename(s) for s in shards],
                  "skipped": {r: len(w) for r, w in skipped.items()},
                  "examples": {r: w[:EXAMPLES_PER_REASON] for r, w in skipped.items()}}
        # The marker last: a file without one is written again by the next run.
        with open(done + ".tmp", "w", encoding="utf-8") as f:
          json.dump(counts, f)
        os.replace(done + ".tmp", done)
      summary["written"] += counts["written"]
      summary["shards"] += [os.path.join(out_dir, s) for s in counts["shards"]]
      for reason, n in counts["skipped"].items():
        summary["skipped"][reason] = summary["skipped"].get(reason, 0) + n
        named = summary["examples"].setdefault(reason, [])
        named.extend(counts["examples"][reason][:EXAMPLES_PER_REASON - len(named)])
  if mine and not summary["written"]:
    raise ValueError(f"no documents in {', '.join(p for _, p in mine)}")
  return summary


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Text files (.txt, .jsonl, .parquet) -> text-record ArrayRecord shards "
                  "(config.data.text).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--input", required=True,
                      help="comma-separated files, directories or globs")
  parser.add_argument("--out", required=True, help="output directory for the shards")
  parser.add_argument("--text_key", default="text", help="JSONL field / parquet column")
  parser.add_argument("--txt_docs", default="blank_line", choices=("blank_line", "file"),
                      help=".txt documents: separated by blank lines, or one per file")
  parser.add_argument("--shard_size", type=int, default=100_000, help="records per shard")
  parser.add_argument("--overwrite", action="store_true",
                      help="--out holds text shards of other inputs: delete them first")
  parser.add_argument("--process_index", type=int, default=None,
                      help="this host's index (default: jax.process_index())")
  parser.add_argument("--process_count", type=int, default=None,
                      help="hosts sharing the job; input file F is written by host F %% count "
                      "(default: jax.process_count())")
  args = parser.parse_args(argv)
  index, count = args.process_index, args.process_count
  if index is None or count is None:
    import jax  # only for the defaults: jax's process index/count (1 process without init)
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  try:
    summary = make_text_records(input_files(args.input), args.out, text_key=args.text_key,
                                txt_docs=args.txt_docs, shard_size=args.shard_size,
                                overwrite=args.overwrite, process_index=index,
                                process_count=count)
  except (ValueError, FileNotFoundError) as e:
    print(f"tfusion-make-text-records: error: {e}", file=sys.stderr)
    sys.exit(2)
  for reason, n in sorted(summary["skipped"].items()):
    named = summary["examples"][reason]
    print(f"skipped ({reason}, {n}x): {', '.join(named)}" + (", ..." if n > len(named) else ""))
  skipped = sum(summary["skipped"].values())
  done = summary["files_done_before"]
  print(f"wrote {summary['written']} text records in {len(summary['shards'])} shards to "
        f"{args.out}" + (f" ({done} input files were already done)" if done else "")
        + (f" (process {index} of {count})" if count > 1 else "")
        + f"; skipped {skipped}; train with --config.data.text={args.out}")


if __name__ == "__main__":
  main()
