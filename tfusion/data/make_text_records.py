"""`tfusion-make-text-records`: text files -> text-record ArrayRecord shards for config.data.text.

  tfusion-make-text-records --input corpus.txt,more/,web-*.jsonl --out TEXT_RECORDS
      [--text_key text] [--txt_docs blank_line|file] [--shard_size 100000] [--overwrite]

Inputs are comma-separated files, directories (their .txt, .jsonl and .parquet files) or
globs, read in sorted order:
  .txt      documents separated by blank lines (the convention of config.eval.ppl_files);
            with --txt_docs=file, each file is one document
  .jsonl    one JSON object per line, its --text_key field (default "text") is the document
  .parquet  the --text_key column, one document per row (needs pyarrow: pip install pyarrow)
Each document becomes one record of kind "text" (tfusion/data/records.py) with an id naming
its file and line (or row), written in shards of --shard_size records:
OUT/text-SSSSS.array_record, each appearing under its name only when complete. Empty
documents, lines that are not JSON and objects without a string --text_key are skipped,
counted by reason and named (the first few). A file that is not UTF-8 stops the job naming it.
OUT must not hold text shards already, unless --overwrite (they are deleted first).
Then train with --config.data.text=OUT.
"""

import argparse
import json
import os
import sys

from tfusion.data import records as records_lib

FORMATS = (".txt", ".jsonl", ".parquet")
PREFIX = "text-"
EXAMPLES_PER_REASON = 3


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


def existing_shards(out_dir):
  if not os.path.isdir(out_dir):
    return []
  return sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                if f.startswith(PREFIX) and f.endswith((records_lib.EXTENSION,
                                                        records_lib.EXTENSION + ".tmp")))


def make_text_records(files, out_dir, *, text_key="text", txt_docs="blank_line",
                      shard_size=100_000, overwrite=False, show_progress=True):
  """Writes the documents of `files` as text records; returns a summary dict.

  {"written": n, "shards": [paths], "skipped": {reason: n}, "examples": {reason: [ids]}}
  """
  from tqdm import tqdm
  if shard_size < 1:
    raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
  if txt_docs not in ("blank_line", "file"):
    raise ValueError(f"--txt_docs must be blank_line or file, got {txt_docs!r}")
  old = existing_shards(out_dir)
  if old and not overwrite:
    raise ValueError(f"{out_dir} already holds {len(old)} text shards ({os.path.basename(old[0])}"
                     ", ...); use --overwrite to replace them, or another --out")
  for path in old:
    os.remove(path)
  os.makedirs(out_dir, exist_ok=True)
  summary = {"written": 0, "shards": [], "skipped": {}, "examples": {}}
  writer = None

  def skip(reason, where):
    summary["skipped"][reason] = summary["skipped"].get(reason, 0) + 1
    named = summary["examples"].setdefault(reason, [])
    if len(named) < EXAMPLES_PER_REASON:
      named.append(where)

  try:
    # disable=None: a progress bar on a terminal, none in logs.
    with tqdm(unit="doc", disable=None if show_progress else True,
              desc="text records") as progress:
      for path in files:
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
            shard = os.path.join(out_dir, f"{PREFIX}{len(summary['shards']):05d}"
                                 f"{records_lib.EXTENSION}")
            writer = records_lib.RecordWriter(shard)
          writer.write(records_lib.text_record(text, id=where))
          summary["written"] += 1
          if writer.count == shard_size:
            writer.close()
            summary["shards"].append(writer.path)
            writer = None
    if writer is not None:
      writer.close()
      summary["shards"].append(writer.path)
      writer = None
  finally:
    if writer is not None:
      writer.abort()  # a failed run leaves complete shards only
  if not summary["written"]:
    raise ValueError(f"no documents in {', '.join(files)}")
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
                      help="--out holds text shards: delete them first")
  args = parser.parse_args(argv)
  try:
    summary = make_text_records(input_files(args.input), args.out, text_key=args.text_key,
                                txt_docs=args.txt_docs, shard_size=args.shard_size,
                                overwrite=args.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f"tfusion-make-text-records: error: {e}", file=sys.stderr)
    sys.exit(2)
  for reason, n in sorted(summary["skipped"].items()):
    named = summary["examples"][reason]
    print(f"skipped ({reason}, {n}x): {', '.join(named)}" + (", ..." if n > len(named) else ""))
  skipped = sum(summary["skipped"].values())
  print(f"wrote {summary['written']} text records in {len(summary['shards'])} shards to "
        f"{args.out}; skipped {skipped}; train with --config.data.text={args.out}")


if __name__ == "__main__":
  main()
