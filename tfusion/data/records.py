"""The training-data record schema: writers, readers and per-record validation.

Files are ArrayRecord (`.array_record`, written with `group_size:1` for random access). Each
record is one document, a MessagePack map with a `kind` and the keys of that kind. Nothing
else is allowed: an unknown key is a bad record, not a silently ignored one.

kind "text": a text document.
    text     str, non-empty                      raw text (tokenized by the pipeline), or
    ids      array int32 [n], n >= 1             pre-tokenized ids (same tokenizer as training;
                                                 no BOS/EOS/BOI/EOI: the pipeline adds them)
kind "image_caption": an image (as a VAE latent or as VQ codes) with its caption.
    latent   array float16|float32 [h, w, c]     normalized VAE latent (`tfusion.vae.VAE.encode`), or
    codes    array int16|int32 [h, w], >= 0      VQ-VAE codes (`VQVAE.encode_codes`; the discrete
                                                 images of the Chameleon baseline), exactly one
    caption  str, non-empty after strip()
kind "interleaved": a document of text and images in reading order.
    segments list (non-empty) of maps, each with exactly one of
             text str | ids array int32 [n] | latent array float16|float32 [h, w, c]
             | codes array int [h, w]
Every kind may carry
    id       str                                 provenance (file name, URL, dataset key)

An array is a map {dtype: str (numpy name), shape: [int, ...], data: bytes (little-endian,
C order)}. Latents must be finite. Codes are checked against the codebook
(config.model.image.codebook_size) by the pipeline, which knows it; a latent where the model is
discrete, or codes where it is continuous, is an error naming the file and the setting. The
data pipeline (tfusion/data/pipeline.py) turns records into documents: BOS, text / BOI + patches + EOI, EOS; image–caption pairs caption-first with
probability 0.8 (else image-first, noise-limited), captions dropped with probability 0.1.

Reading validates every record; a bad one raises `BadRecordError` naming the file and the
record index (or, with on_bad_record="skip" in the pipeline, is skipped and counted).
Write with `RecordWriter` (atomic: the file appears under its name only when closed) and
read with `RecordSource` (random access over many files: Grain's data-source protocol).
"""

import dataclasses
import glob
import math
import os

import msgpack
import numpy as np
from array_record.python import array_record_module

KINDS = ("text", "image_caption", "interleaved")
LATENT_DTYPES = ("float16", "float32")
IMAGE_KEYS = ("latent", "codes")  # how a record holds an image: continuous | discrete
EXTENSION = ".array_record"

_KEYS = {
    "text": ({"text", "ids"}, {"id"}),
    "image_caption": ({"caption"}, {"id", "latent", "codes"}),
    "interleaved": ({"segments"}, {"id"}),
}
_ARRAY_KEYS = {"dtype", "shape", "data"}


class BadRecordError(ValueError):
  """A record that does not follow the schema (the message names file and record index)."""

  def __init__(self, where, reason, code="malformed"):
    super().__init__(f"{where}: {reason}")
    self.where = where
    self.reason = reason
    self.code = code  # short category for counting skipped records


class _Bad(Exception):
  def __init__(self, reason, code):
    super().__init__(reason)
    self.reason, self.code = reason, code


# -- encoding -----------------------------------------------------------------------------


def _encode_array(array, what):
  a = np.asarray(array)
  if a.dtype.byteorder == ">":
    a = a.astype(a.dtype.newbyteorder("<"))
  return {"dtype": a.dtype.name, "shape": list(a.shape), "data": np.ascontiguousarray(a).tobytes()}


def text_record(text=None, *, ids=None, id=None):  # pylint: disable=redefined-builtin
  """A text document from raw text or pre-tokenized ids."""
  if (text is None) == (ids is None):
    raise ValueError("a text record needs exactly one of text or ids")
  rec = {"kind": "text"}
  if text is not None:
    rec["text"] = text
  else:
    rec["ids"] = np.asarray(ids, np.int32)
  if id is not None:
    rec["id"] = id
  return rec


def image_caption_record(latent=None, caption=None, *, codes=None, id=None):  # pylint: disable=redefined-builtin
  """An image–caption pair: `latent` float [h, w, c] (stored as float16 unless float32), or
  `codes` int [h, w] (VQ codes, stored as int16 when they fit, else int32)."""
  if (latent is None) == (codes is None):
    raise ValueError("an image_caption record needs exactly one of latent or codes")
  if latent is not None:
    latent = np.asarray(latent)
    if latent.dtype.name not in LATENT_DTYPES:
      latent = latent.astype(np.float16)
    rec = {"kind": "image_caption", "latent": latent, "caption": caption}
  else:
    rec = {"kind": "image_caption", "codes": _codes_array(codes), "caption": caption}
  if id is not None:
    rec["id"] = id
  return rec


def _codes_array(codes):
  codes = np.asarray(codes)
  if codes.dtype.kind in "iu" and codes.size and 0 <= codes.min() and codes.max() < 2 ** 15:
    return codes.astype(np.int16)
  return codes.astype(np.int32) if codes.dtype.kind in "iu" else codes


def interleaved_record(segments, *, id=None):  # pylint: disable=redefined-builtin
  """`segments`: list of str (text), int arrays [n] (ids), float arrays [h, w, c] (latents) or
  int arrays [h, w] (VQ codes), in reading order."""
  segs = []
  for s in segments:
    if isinstance(s, str):
      segs.append({"text": s})
    else:
      a = np.asarray(s)
      if a.dtype.kind in "iu" and a.ndim == 2:
        segs.append({"codes": _codes_array(a)})
      elif a.dtype.kind in "iu":
        segs.append({"ids": a.astype(np.int32)})
      else:
        segs.append({"latent": a if a.dtype.name in LATENT_DTYPES else a.astype(np.float16)})
  rec = {"kind": "interleaved", "segments": segs}
  if id is not None:
    rec["id"] = id
  return rec


def encode_record(record):
  """A record dict (numpy arrays allowed) -> bytes. Validates it first."""
  validate(record, where="record to write")

  def convert(x, what):
    if isinstance(x, np.ndarray):
      return _encode_array(x, what)
    if isinstance(x, dict):
      return {k: convert(v, k) for k, v in x.items()}
    if isinstance(x, list):
      return [convert(v, what) for v in x]
    return x

  return msgpack.packb(convert(record, "record"), use_bin_type=True)


# -- decoding and validation ----------------------------------------------------------------


def _decode_array(value, what):
  if not isinstance(value, dict) or set(value) != _ARRAY_KEYS:
    raise _Bad(f"{what} must be an array map with keys {sorted(_ARRAY_KEYS)}", "malformed")
  dtype, shape, data = value["dtype"], value["shape"], value["data"]
  try:
    dtype = np.dtype(dtype)
  except Exception:  # numpy raises TypeError, ValueError, KeyError... for odd specs
    raise _Bad(f"{what} has unknown dtype {dtype!r}", "dtype") from None
  # Only plain numbers in the schema's byte order; object, string, structured or big-endian
  # dtypes would fail (or be misread) below instead of naming the record.
  if dtype.kind not in "iuf" or dtype.byteorder == ">":
    raise _Bad(f"{what} has dtype {dtype.str}; arrays hold little-endian integers or floats",
               "dtype")
  if (not isinstance(shape, list)
      or not all(type(s) is int and s >= 0 for s in shape)  # pylint: disable=unidiomatic-typecheck
      or not isinstance(data, bytes)):
    raise _Bad(f"{what} has a malformed shape or data field", "malformed")
  count = math.prod(shape)  # Python ints: a huge shape cannot overflow to a small count
  if len(data) != count * dtype.itemsize:
    raise _Bad(f"{what} holds {len(data)} bytes; dtype {dtype.name} shape {shape} needs "
               f"{count * dtype.itemsize}", "malformed")
  return np.frombuffer(data, dtype.newbyteorder("<")).reshape(shape)


def _all_finite(a):
  if a.dtype == np.float16:  # exponent bits all ones = Inf or NaN; 3x faster than isfinite
    return not ((a.view(np.uint16) & 0x7C00) == 0x7C00).any()
  return bool(np.isfinite(a).all())


def _check_latent(a, what):
  if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4):
    raise _Bad(f"{what} has dtype {a.dtype.name}; latents are {' or '.join(LATENT_DTYPES)}",
               "dtype")
  if a.ndim != 3 or min(a.shape) == 0:
    raise _Bad(f"{what} has shape {list(a.shape)}; latents are [h, w, c]", "latent_shape")
  if not _all_finite(a):
    raise _Bad(f"{what} holds NaN or Inf", "nonfinite")


def _check_codes(a, what):
  if a.dtype.kind not in "iu":
    raise _Bad(f"{what} has dtype {a.dtype.name}; VQ codes are integers", "dtype")
  if a.ndim != 2 or min(a.shape) == 0:
    raise _Bad(f"{what} has shape {list(a.shape)}; VQ codes are [h, w]", "latent_shape")
  if a.min() < 0:
    raise _Bad(f"{what} holds negative codes", "codes")


def _check_ids(a, what):
  if a.dtype.kind not in "iu" or a.ndim != 1:
    raise _Bad(f"{what} must be a 1-D integer array, got {a.dtype.name} {list(a.shape)}", "ids")
  if a.size == 0:
    raise _Bad(f"{what} is empty", "empty_text")
  if a.min() < 0:
    raise _Bad(f"{what} holds negative ids", "ids")


def _check_text(s, what):
  if not isinstance(s, str):
    raise _Bad(f"{what} must be a string, got {type(s).__name__}", "malformed")
  if not s.strip():
    raise _Bad(f"{what} is empty", "empty_caption" if what == "caption" else "empty_text")


def _keys(rec, kind):
  required, optional = _KEYS[kind]
  unknown = sorted(set(rec) - required - optional - {"kind"})
  if unknown:
    raise _Bad(f"unknown keys {unknown} in a {kind!r} record (allowed: "
               f"{sorted(required | optional)})", "unknown_keys")
  if kind == "text":
    if ("text" in rec) == ("ids" in rec):
      raise _Bad("a 'text' record needs exactly one of 'text' or 'ids'", "malformed")
  else:
    missing = sorted(required - set(rec))
    if missing:
      raise _Bad(f"a {kind!r} record lacks keys {missing}", "malformed")
    if kind == "image_caption" and ("latent" in rec) == ("codes" in rec):
      raise _Bad("an 'image_caption' record needs exactly one of 'latent' or 'codes'",
                 "malformed")
  if "id" in rec and not isinstance(rec["id"], str):
    raise _Bad("'id' must be a string", "malformed")


def _parse(rec, decode_arrays):
  """Validates a record map; returns it with arrays as numpy. Raises _Bad."""
  if not isinstance(rec, dict):
    raise _Bad(f"a record must be a map, got {type(rec).__name__}", "undecodable")
  kind = rec.get("kind")
  if kind not in KINDS:
    raise _Bad(f"unknown kind {kind!r} (expected one of {list(KINDS)})", "unknown_kind")
  _keys(rec, kind)
  arr = _decode_array if decode_arrays else (lambda v, what: np.asarray(v))
  out = dict(rec)
  if kind == "text":
    if "text" in rec:
      _check_text(rec["text"], "text")
    else:
      out["ids"] = arr(rec["ids"], "ids")
      _check_ids(out["ids"], "ids")
  elif kind == "image_caption":
    if "latent" in rec:
      out["latent"] = arr(rec["latent"], "latent")
      _check_latent(out["latent"], "latent")
    else:
      out["codes"] = arr(rec["codes"], "codes")
      _check_codes(out["codes"], "codes")
    _check_text(rec["caption"], "caption")
  else:
    segs = rec["segments"]
    if not isinstance(segs, list) or not segs:
      raise _Bad("'segments' must be a non-empty list", "malformed")
    parsed = []
    for i, seg in enumerate(segs):
      what = f"segment {i}"
      if not isinstance(seg, dict) or len(seg) != 1 or next(iter(seg)) not in (
          "text", "ids", "latent", "codes"):
        raise _Bad(f"{what} must be a map with exactly one of 'text', 'ids', 'latent', 'codes'",
                   "unknown_keys")
      (key, value), = seg.items()
      if key == "text":
        _check_text(value, f"{what} text")
      elif key == "ids":
        value = arr(value, f"{what} ids")
        _check_ids(value, f"{what} ids")
      elif key == "codes":
        value = arr(value, f"{what} codes")
        _check_codes(value, f"{what} codes")
      else:
        value = arr(value, f"{what} latent")
        _check_latent(value, f"{what} latent")
      parsed.append({key: value})
    out["segments"] = parsed
  return out


def validate(record, *, where="record"):
  """Checks an in-memory record dict (numpy arrays) against the schema."""
  try:
    _parse(record, decode_arrays=False)
  except _Bad as e:
    raise BadRecordError(where, e.reason, e.code) from None


def decode_record(data, *, where="record"):
  """bytes -> validated record dict with numpy arrays (read-only views of `data`)."""
  try:
    rec = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except Exception as e:  # msgpack raises several types (ExtraData, ValueError, ...)
    raise BadRecordError(where, f"undecodable record ({type(e).__name__}: {e})",
                         "undecodable") from None
  try:
    return _parse(rec, decode_arrays=True)
  except _Bad as e:
    raise BadRecordError(where, e.reason, e.code) from None


# -- files ----------------------------------------------------------------------------------


class RecordWriter:
  """Writes records to one ArrayRecord file, atomically (PATH.tmp renamed on close).

  `options`: ArrayRecord writer options; keep group_size:1 (random access). Latent shards are
  written uncompressed (random floats do not compress; reads are 4x faster).
  """

  def __init__(self, path, options="group_size:1"):
    if "group_size:1" not in options.split(","):
      raise ValueError(f"ArrayRecord options {options!r} need group_size:1 (random access)")
    self.path = path
    self._tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, options)
    if not self._writer.ok():
      raise OSError(f"cannot write {self._tmp}")
    self.count = 0

  def write(self, record):
    """Writes a record dict (validated) or already-encoded bytes (written as they are)."""
    self._writer.write(record if isinstance(record, bytes) else encode_record(record))
    self.count += 1

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.replace(self._tmp, self.path)

  def abort(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.remove(self._tmp)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_records(path, records, options="group_size:1"):
  """Writes an iterable of records to `path`; returns the count."""
  with RecordWriter(path, options) as w:
    for r in records:
      w.write(r)
  return w.count


def resolve_paths(spec, key="paths", *, extensions=(EXTENSION,), what="ArrayRecord file"):
  """Comma-separated files, directories (their files ending in `extensions`) or glob patterns
  -> sorted files.

  Raises FileNotFoundError naming `key` and the part that matched nothing (`what` names the
  kind of file expected).
  """
  parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
  parts = [p for p in parts if p]
  if not parts:
    raise FileNotFoundError(f"{key} is empty: give {what}s, directories or globs")
  files = []
  for part in parts:
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      found = sorted(f for ext in extensions for f in glob.glob(os.path.join(part, "*" + ext)))
    elif any(c in part for c in "*?["):
      found = sorted(f for f in glob.glob(part) if os.path.isfile(f))
    else:
      found = [part] if os.path.isfile(part) else []
    if not found:
      raise FileNotFoundError(f"{key}: {part!r} matches no {what} ({', '.join(extensions)})")
    files.extend(found)
  return files


@dataclasses.dataclass(frozen=True)
class RawRecord:
  """Undecoded bytes with their origin (for error messages)."""
  path: str
  index: int
  data: bytes

  @property
  def where(self):
    return f"{self.path}: record {self.index}"


class RecordSource:
  """Random access over the records of several ArrayRecord files (Grain data source).

  `source[i]` -> RawRecord. Readers open lazily in each process (picklable for workers).
  """

  def __init__(self, paths, *, key="paths"):
    self.paths = list(paths)
    counts = []
    for path in self.paths:
      reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
      if not reader.ok():
        raise ValueError(f"{key}: {path} is not a readable ArrayRecord file")
      counts.append(reader.num_records())
      reader.close()
    if sum(counts) == 0:
      raise ValueError(f"{key}: the files {self.paths} hold no records")
    self.counts = counts
    self._offsets = np.cumsum([0] + counts)
    self._readers = {}

  def __len__(self):
    return int(self._offsets[-1])

  def locate(self, i):
    """Global index -> (file number, index in that file)."""
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range for {len(self)} records")
    f = int(np.searchsorted(self._offsets, i, side="right")) - 1
    return f, i - int(self._offsets[f])

  def __getitem__(self, i):
    f, j = self.locate(int(i))
    reader = self._readers.get(f)
    if reader is None:
      reader = self._readers[f] = array_record_module.ArrayRecordReader(
          self.paths[f], "readahead_buffer_size:0")
    return RawRecord(self.paths[f], j, reader.read([j])[0])

  def __getstate__(self):
    return {"paths": self.paths, "counts": self.counts, "_offsets": self._offsets}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = {}

  def __repr__(self):
    return f"RecordSource({len(self.paths)} files, {len(self)} records)"


def read_records(path):
  """All records of one file, decoded and validated (for tools and tests)."""
  source = RecordSource([path])
  return [decode_record(source[i].data, where=source[i].where) for i in range(len(source))]
