"""Web-scale image–caption inputs for tfusion-precompute-latents: tar shards, parquet, COCO.

Each source is a sequence-like object the precompute job shards by item index: `len(source)`
items in a fixed order, `source.iter_range(start, stop)` streams the Items of one output shard
(records of the inputs are read in file order, never all at once), and `source.inputs()` is
the manifest's fingerprint of what the items are made from.

- WebDatasetItems: webdataset / img2dataset .tar shards. Members are grouped by key (the name
  up to the first dot of its basename: 000123.jpg, 000123.txt, 000123.json), the image is the
  jpg/jpeg/png/webp member, the caption the .txt member, else the `caption_key` field of the
  .json. Listing reads tar headers only (it seeks over the data). A truncated or corrupt tar
  keeps the samples read before the damage and adds one item skipped as "corrupt tar".
- ParquetItems: local parquet files (HF datasets style): an image column holding a struct with
  `bytes` (how HF `Image()` features are stored) or raw binary, and a caption column. Row counts
  come from the file metadata; rows are read by row group.
- coco_items: COCO captions JSON (and/or Karpathy's dataset_coco.json split) with an image
  folder: one item per caption, the record id the image file so captions group by image.
"""

import collections
import hashlib
import io
import json
import os
import re
import tarfile

from tfusion.data import precompute
from tfusion.data import records as records_lib

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# webdataset's key/extension split: the directory plus the basename up to its first dot.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def _image_loader(data):
  """Item.load for encoded image bytes (decoded in the encode loop, batch by batch)."""
  from tfusion.vae import images as images_lib

  def load(resolution):
    try:
      return images_lib.load_image(io.BytesIO(data), resolution)
    except images_lib.BadImageError:
      raise precompute.SkipItem("unreadable image") from None
  return load


def _skipped(key, reason):
  return precompute.Item(key, "", None, skip=reason)


def _names_and_sizes(paths):
  """The manifest's input fingerprint: base names and byte sizes (survives copying)."""
  return precompute.content_hash(
      f"{os.path.basename(p)}:{os.path.getsize(p)}" for p in paths)


class _Ranges:
  """Maps a global item range onto consecutive per-file counts."""

  def __init__(self, counts):
    self.counts = list(counts)
    self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
    self.total = sum(self.counts)

  def split(self, start, stop):
    """-> [(file index, local start, local stop)] covering [start, stop)."""
    out = []
    for f, (first, n) in enumerate(zip(self.starts, self.counts)):
      lo, hi = max(start, first), min(stop, first + n)
      if lo < hi:
        out.append((f, lo - first, hi - first))
    return out


# -- webdataset tar shards ------------------------------------------------------------------


def _tail_is_end_of_archive(f, offset):
  """Whether everything after `offset` is zero blocks (a tar's end marker and padding)."""
  f.seek(offset)
  seen = 0
  while chunk := f.read(1 << 20):
    if chunk.count(0) != len(chunk):
      return False
    seen += len(chunk)
  return seen >= 512


def list_tar_samples(path):
  """-> ([(key, {ext: TarInfo})] in tar order, None or why the tar is corrupt).

  Reads headers only. tarfile stops quietly at a damaged header after the first, and lists a
  member cut short by truncation, so the end is checked: members whose data lies past the end
  of the file are dropped, and anything but zero blocks after the last member is corruption.
  """
  size = os.path.getsize(path)
  groups, error = collections.OrderedDict(), None
  with open(path, "rb") as f:
    try:
      with tarfile.open(fileobj=f, mode="r:") as tar:
        try:
          for info in tar:
            if info.offset_data + info.size > size:
              error = "truncated"
              break
            m = _KEY_EXT.match(info.name)
            if info.isfile() and m:
              groups.setdefault(m.group(1), {})[m.group(2).lower()] = info
          else:
            if not _tail_is_end_of_archive(f, tar.offset):
              error = "corrupt or truncated after the last complete member"
        except (tarfile.TarError, EOFError, OSError) as e:
          error = f"{e}" or type(e).__name__
    except (tarfile.TarError, EOFError, OSError) as e:  # not even a first header
      error = f"not a tar file ({e})"
  return list(groups.items()), error


class WebDatasetItems:
  """Items from webdataset / img2dataset tar shards (see the module docstring)."""

  def __init__(self, spec, caption_key="caption"):
    self.paths = records_lib.resolve_paths(spec, "--webdataset", extensions=(".tar",),
                                           what=".tar file")
    self.caption_key = caption_key
    counts, listed = [], []
    for path in self.paths:
      groups, error = list_tar_samples(path)
      counts.append(len(groups) + (1 if error else 0))  # a corrupt tar: one skipped item
      # Member names and sizes: a tar is padded to 10 KiB records, so its own size often
      # stays the same when a caption is edited.
      listed.append(precompute.content_hash([error or ""] + [
          f"{key}.{ext}:{info.size}" for key, members in groups
          for ext, info in sorted(members.items())]))
    self._members = precompute.content_hash(listed)
    self._ranges = _Ranges(counts)
    self._cached = (None, None)  # (path, listing): consecutive output shards share a tar

  def __len__(self):
    return self._ranges.total

  def inputs(self):
    """Manifest fingerprint: the tar files' names and sizes, and their members'."""
    return {"tars": _names_and_sizes(self.paths), "tar_members": self._members}

  def _listing(self, path):
    if self._cached[0] != path:
      self._cached = (path, list_tar_samples(path))
    return self._cached[1]

  def _caption(self, tar, members):
    """-> (caption, None) or (None, skip reason)."""
    if "txt" in members:
      return tar.extractfile(members["txt"]).read().decode("utf-8", errors="replace"), None
    if "json" not in members:
      return None, "missing caption"
    try:
      meta = json.loads(tar.extractfile(members["json"]).read())
    except (json.JSONDecodeError, UnicodeDecodeError):
      return None, "unreadable caption json"
    caption = meta.get(self.caption_key) if isinstance(meta, dict) else None
    if not isinstance(caption, str):
      return None, "missing caption"
    return caption, None

  def _sample(self, tar, name, key, members):
    where = f"{name}:{key}"
    image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
    if image is None:
      return _skipped(where, "missing image")
    try:
      caption, reason = self._caption(tar, members)
      if reason:
        return _skipped(where, reason)
      data = tar.extractfile(image).read()
    except (tarfile.TarError, EOFError, OSError):
      return _skipped(where, "corrupt tar member")
    return precompute.Item(where, caption, _image_loader(data))

  def iter_range(self, start, stop):
    """Items start..stop-1, streamed from their tars in member order."""
    for f, lo, hi in self._ranges.split(start, stop):
      path = self.paths[f]
      name = os.path.basename(path)
      groups, error = self._listing(path)
      with open(path, "rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for key, members in groups[lo:hi]:
          yield self._sample(tar, name, key, members)
      if error and hi == len(groups) + 1:
        yield _skipped(f"{name} (after {len(groups)} samples: {error})", "corrupt tar")


# -- parquet --------------------------------------------------------------------------------


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError("reading .parquet needs the pyarrow package (pip install pyarrow, or "
                     "pip install -e '.[ingest]')") from None
  return pq


def _image_kind(path, field):
  """'struct' (HF Image: {bytes, path}) or 'binary'; else a ValueError naming the file."""
  import pyarrow as pa
  t = field.type
  if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
    return "struct"
  if pa.types.is_binary(t) or pa.types.is_large_binary(t):
    return "binary"
  raise ValueError(f"{path}: image column {field.name!r} is {t}, not encoded image bytes (a "
                   "struct with 'bytes' as HF datasets stores images, or binary)")


class ParquetItems:
  """Items from local parquet files (see the module docstring); row i of the files in order.

  `caption_column` None: 'caption', else 'text'. Every file is checked before any encoding: a
  file without the columns is a ValueError naming it and the columns it has.
  """

  def __init__(self, spec, image_column="image", caption_column=None):
    pq = _pyarrow_parquet()
    self.paths = records_lib.resolve_paths(spec, "--parquet", extensions=(".parquet",),
                                           what=".parquet file")
    self.image_column = image_column
    self.columns, counts, self._row_groups, self._kinds = [], [], [], []
    for path in self.paths:
      meta = pq.ParquetFile(path)
      schema = meta.schema_arrow
      names = schema.names
      caption = caption_column or next((c for c in ("caption", "text") if c in names), None)
      missing = [repr(c) for c in (image_column, caption) if c and c not in names]
      if caption is None:
        missing.append("'caption' or 'text'")
      if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)} "
                         f"(columns: {names}); set --image_column/--caption_column")
      self._kinds.append(_image_kind(path, schema.field(image_column)))
      self.columns.append(caption)
      counts.append(meta.metadata.num_rows)
      self._row_groups.append([meta.metadata.row_group(g).num_rows
                               for g in range(meta.metadata.num_row_groups)])
    self._ranges = _Ranges(counts)

  def __len__(self):
    return self._ranges.total

  def inputs(self):
    """Manifest fingerprint: the parquet files' names and sizes, and the columns read."""
    return {"parquet": _names_and_sizes(self.paths),
            "columns": f"{self.image_column}, {','.join(sorted(set(self.columns)))}"}

  def _rows(self, f, lo, hi):
    """(row number, image cell, caption cell) for rows lo..hi-1 of file f (by row group)."""
    pq = _pyarrow_parquet()
    sizes = self._row_groups[f]
    first = [sum(sizes[:g]) for g in range(len(sizes))]
    wanted = [g for g in range(len(sizes)) if first[g] < hi and first[g] + sizes[g] > lo]
    if not wanted:
      return
    row = first[wanted[0]]
    columns = [self.image_column, self.columns[f]]
    for batch in pq.ParquetFile(self.paths[f]).iter_batches(batch_size=256, row_groups=wanted,
                                                            columns=columns):
      images, captions = (batch.column(i).to_pylist() for i in range(2))
      for image, caption in zip(images, captions):
        if lo <= row < hi:
          yield row, image, caption
        row += 1
        if row >= hi:
          return

  def iter_range(self, start, stop):
    """Items start..stop-1, read by row group."""
    for f, lo, hi in self._ranges.split(start, stop):
      name = os.path.basename(self.paths[f])
      for row, image, caption in self._rows(f, lo, hi):
        where = f"{name}:row {row}"
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
          yield _skipped(where, "missing image")
        elif not isinstance(caption, str):
          yield _skipped(where, "missing caption")
        else:
          yield precompute.Item(where, caption, _image_loader(bytes(data)))


# -- COCO captions --------------------------------------------------------------------------


def _load_json(path, what):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return json.loads(raw), hashlib.sha256(raw).hexdigest()[:16]
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON ({e})") from None


def coco_images(coco=None, karpathy=None, splits="train"):
  """-> ([(relative image path, [captions])] sorted by image id, {input: content hash}).

  `coco`: a captions_*.json (images [{id, file_name}], annotations [{image_id, caption}]).
  `karpathy`: dataset_coco.json (images [{filepath, filename, split, sentences [{raw}],
  cocoid}]) selects the images of `splits` (comma list: train, val, test, restval); their
  captions are Karpathy's sentences, or the `coco` file's where it annotates the image.
  """
  if not coco and not karpathy:
    raise ValueError("give --coco ANNOTATIONS.json and/or --karpathy dataset_coco.json")
  inputs, by_id = {}, {}
  if coco:
    data, inputs["coco"] = _load_json(coco, "--coco annotations")
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
      raise ValueError(f"{coco}: a COCO captions file needs 'images' and 'annotations'")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    for ann in data["annotations"]:
      if ann["image_id"] in files:
        by_id.setdefault(ann["image_id"], (files[ann["image_id"]], []))[1].append(ann["caption"])
    for image_id, name in files.items():
      by_id.setdefault(image_id, (name, []))
  if karpathy:
    data, inputs["karpathy"] = _load_json(karpathy, "--karpathy")
    wanted = {s.strip() for s in splits.split(",") if s.strip()}
    chosen = {}
    for im in data["images"]:
      if im.get("split") not in wanted:
        continue
      image_id = im.get("cocoid", im.get("imgid"))
      captions = by_id.get(image_id, (None, []))[1] or [s["raw"] for s in im["sentences"]]
      chosen[image_id] = (os.path.join(im.get("filepath", ""), im["filename"]), captions)
    if not chosen:
      found = sorted({str(im.get("split")) for im in data["images"]})
      raise ValueError(f"{karpathy}: no images in split {splits!r} (splits: {found})")
    inputs["split"] = ",".join(sorted(wanted))
    by_id = chosen
  return [by_id[i] for i in sorted(by_id, key=str)], inputs


def coco_items(images_dir, coco=None, karpathy=None, splits="train"):
  """-> (Items, one per caption, {input: fingerprint}, [(image file, [captions])]).

  Images are found as FOLDER/path or, for Karpathy's filepath/filename, FOLDER/filename.
  Record ids are the image paths, so the caption suite groups an image's references.
  """
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"image folder {images_dir!r} does not exist")
  images, inputs = coco_images(coco, karpathy, splits)
  items, sizes = [], []
  for name, captions in images:
    path = os.path.join(images_dir, name)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(images_dir,
                                                                os.path.basename(name))):
      path = os.path.join(images_dir, os.path.basename(name))
    sizes.append(f"{name}:{os.path.getsize(path) if os.path.isfile(path) else -1}")
    load = precompute.file_loader(path)
    for n, caption in enumerate(captions):
      items.append(precompute.Item(f"{name} (caption {n})",
                                   caption if isinstance(caption, str) else "", load, id=name))
  inputs["images"] = precompute.content_hash(sizes)
  return items, inputs, images


def write_eval_files(images, out_dir):
  """OUT/references.jsonl ({"file", "captions"} per image) and OUT/prompts.jsonl ({"caption"}:
  each image's first caption, for config.eval.prompts, e.g. the FID-30k prompt set)."""
  os.makedirs(out_dir, exist_ok=True)
  refs = [(f, [c.strip() for c in caps if isinstance(c, str) and c.strip()])
          for f, caps in images]
  for name, lines in (("references.jsonl", ({"file": f, "captions": c} for f, c in refs)),
                      ("prompts.jsonl", ({"caption": c[0]} for _, c in refs if c))):
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      for line in lines:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_references(path):
  """{file: [captions]} from a references.jsonl written by `write_eval_files`."""
  with open(path, encoding="utf-8") as f:
    return {obj["file"]: obj["captions"] for obj in map(json.loads, f) if obj}

