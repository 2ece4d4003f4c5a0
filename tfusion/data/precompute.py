"""`tfusion-precompute-latents`: images + captions -> VAE latents in image–caption record shards.

  tfusion-precompute-latents (--vae VAE_DIR | --vq VQ_DIR) --out OUT_DIR \\
      (--images FOLDER --captions captions.jsonl|captions.csv
       | --webdataset 'DIR|GLOB|a.tar,b.tar' [--caption_key caption]
       | --parquet 'DIR|GLOB|a.parquet,...' [--image_column image] [--caption_column caption]
       | --images FOLDER (--coco captions_train2017.json | --karpathy dataset_coco.json
                          [--split train|val|test|restval])
       | --tfds NAME --data_dir DIR [--split train] [--image_key image] [--caption_key caption])
      [--resolution 256] [--batch_size 32] [--shard_size 4096] [--latent_dtype float16]
      [--process_index I --process_count N] [--overwrite]

Captions files: JSONL lines {"file": "name.jpg", "caption": "..."} or a CSV with columns
`file` and `caption`; file names are relative to the image folder; one record per line (an
image with five captions gives five records). TFDS datasets must already be prepared in
`data_dir` (array_record format); nothing is downloaded. Webdataset/img2dataset tar shards,
parquet files and COCO/Karpathy captions are read by tfusion/data/ingest_sources.py (samples in
a fixed order, streamed shard by shard; a COCO run also writes OUT/references.jsonl and
OUT/prompts.jsonl for the caption and FID evals).

Images are center-cropped and resized to `resolution` (tfusion/vae/images.py), encoded with
the project VAE (`VAE.encode`: posterior mean, normalized) in fixed-size batches jitted once
and split over the local devices, and written as records of the schema in records.py, item i
in shard i // shard_size: OUT/image_caption-SSSSS-of-NNNNN.array_record. A shard appears
under its name only when complete, beside a .json with its counts; rerunning skips finished
shards. Unreadable images, empty captions, missing files and non-finite latents are skipped,
counted by reason, and reported at the end with the first few items of each reason; when every
item is skipped the job fails (exit 2) with those counts. Throughput (images/s) is shown in the
progress bar and printed at the end.

Several hosts share a job with --process_index/--process_count (default: jax's, when
jax.distributed is initialised, else 0 of 1): host i writes shards i, i + N, ...; host 0
checks --out and writes the manifest, the others wait for it. Every host lists all inputs
(headers and metadata only) to agree on the item order.

OUT/precompute.json (the manifest) records what the shards were made from: a fingerprint of
the VAE (parameters, architecture, latent normalization), the resolution, latent dtype and
shard layout, and the inputs: the captions file's content hash and the referenced images'
names and byte sizes (cheap, and unchanged by copying a dataset elsewhere; an image rewritten
in place to exactly the same size is not noticed), the tar or parquet files' names and sizes
(and the tars' member names and sizes), the COCO/Karpathy files' content hashes, the TFDS
dataset name/split/data_dir, or a hash of in-memory arrays. A rerun whose inputs differ
stops with one line naming what changed (VAE, resolution, captions, images, ...) unless
--overwrite, which deletes the old shards first; a matching rerun resumes shard by shard.

With `--vq VQ_DIR` (a VQ-VAE, tfusion/vae/vq.py) the same job writes discrete images: each
record holds the image's codes int [h, w] (`VQVAE.encode_codes`) instead of a latent, for
config.model.image.representation="discrete" (the Chameleon baseline); the manifest then
fingerprints the VQ-VAE (weights and codebook) and records "codes": {shape, codebook_size}.

From Python (the demo): `write_latent_records(images, captions, vae, out_dir)` does the same
for in-memory arrays (`vae` a VAE or a VQVAE).
"""

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Callable

import numpy as np

from tfusion.data import records as records_lib

MANIFEST = "precompute.json"
MANIFEST_FORMAT = 2  # 2: with VAE and input fingerprints
EXAMPLES_PER_REASON = 3  # skipped items named per reason in the summary
# What a manifest key means, for "... changed" messages.
_LABELS = {"vae": "the VAE (weights, config or latent statistics) or VQ-VAE", "resolution": "resolution",
           "latent_dtype": "latent dtype", "shard_size": "shard size",
           "items": "number of items", "captions": "captions", "images": "images",
           "dataset": "TFDS dataset", "tars": "tar shards (names or sizes)",
           "tar_members": "tar members (names or sizes)",
           "parquet": "parquet files (names or sizes)", "columns": "parquet columns",
           "coco": "COCO annotations", "karpathy": "Karpathy split file", "split": "split"}


@dataclasses.dataclass
class Item:
  """One image–caption pair to encode; `load(resolution)` -> float32 [R, R, 3] in [-1, 1].

  `key` names the item in skip reports (and is the record id unless `id` is given: items that
  share an id, e.g. the captions of one COCO image, are one image to the caption eval).
  `skip`: a reason already known when the item was listed (missing caption, corrupt tar, ...).
  """
  key: str
  caption: str
  load: Callable
  id: str | None = None
  skip: str | None = None


class SkipItem(Exception):
  """An item that cannot become a record (the message is the reason category)."""


# -- inputs ---------------------------------------------------------------------------------


def _read_captions(path):
  """[(file, caption, line number)] from a JSONL or CSV captions file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"captions file {path!r} does not exist")
  rows = []
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
        raise ValueError(f"{path}: a captions CSV needs a header with columns 'file' and "
                         f"'caption', got {reader.fieldnames}")
      for row in reader:
        rows.append((row["file"], row["caption"], reader.line_num))
  else:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}: line {n} is not JSON ({e})") from None
        if not isinstance(obj, dict) or "file" not in obj or "caption" not in obj:
          raise ValueError(f"{path}: line {n} needs keys 'file' and 'caption'")
        rows.append((obj["file"], obj["caption"], n))
  if not rows:
    raise ValueError(f"captions file {path!r} holds no captions")
  return rows


def folder_items(images_dir, captions_path):
  """Items from a folder of images and a captions file (missing images become skips)."""
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"image folder {images_dir!r} does not exist")
  items = []
  for name, caption, line in _read_captions(captions_path):
    items.append(Item(f"{name} (line {line})", caption if isinstance(caption, str) else "",
                      file_loader(os.path.join(images_dir, str(name)))))
  return items


def file_loader(path):
  """Item.load for an image file: a missing or unreadable file is a skip, not an error."""
  from tfusion.vae import images as images_lib

  def load(resolution):
    if not os.path.isfile(path):
      raise SkipItem("missing image file")
    try:
      return images_lib.load_image(path, resolution)
    except images_lib.BadImageError:
      raise SkipItem("unreadable image") from None
  return load


def content_hash(parts):
  h = hashlib.sha256()
  for part in parts:
    h.update(part if isinstance(part, bytes) else str(part).encode("utf-8"))
    h.update(b"\0")
  return h.hexdigest()[:16]


def folder_fingerprints(images_dir, captions_path):
  """{"captions": content hash, "images": hash of the referenced files' names and sizes}."""
  with open(captions_path, "rb") as f:
    captions = content_hash([f.read()])
  names = sorted({str(name) for name, _, _ in _read_captions(captions_path)})
  sizes = []
  for name in names:
    path = os.path.join(images_dir, name)
    sizes.append(os.path.getsize(path) if os.path.isfile(path) else -1)
  return {"captions": captions, "images": content_hash(f"{n}:{z}" for n, z in zip(names, sizes))}


def is_vq(model):
  """True for a VQ-VAE (codes out), False for the continuous VAE (latents out)."""
  return hasattr(model, "encode_codes")


def vae_fingerprint(vae):
  """A hash of the VAE's architecture, parameters and latent normalization (a VQ-VAE's:
  architecture, parameters and codebook)."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(vae.params)[0]
  parts = [json.dumps(dataclasses.asdict(vae.config), sort_keys=True, default=list)]
  extra = (vae.codebook,) if is_vq(vae) else (vae.scale, vae.shift)
  for value in extra:
    parts.append(np.asarray(value, np.float32).tobytes())
  for path, leaf in leaves:
    a = np.asarray(jax.device_get(leaf))
    parts += [jax.tree_util.keystr(path), f"{a.dtype.str}{a.shape}", a.tobytes()]
  return content_hash(parts)


class TfdsItems:
  """Items from a TFDS dataset prepared (array_record) in data_dir; lazy random access."""

  def __init__(self, name, data_dir, split="train", image_key="image", caption_key="caption"):
    if not data_dir or not os.path.isdir(data_dir):
      raise FileNotFoundError(f"TFDS data_dir {data_dir!r} does not exist")
    import tensorflow_datasets as tfds
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises many kinds for "not prepared here"
      raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} is not prepared in "
                              f"{data_dir!r} (array_record format): {e}") from None
    self.name, self.image_key, self.caption_key = name, image_key, caption_key

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    from tfusion.vae import images as images_lib
    example = self.source[i]
    for key in (self.image_key, self.caption_key):
      if key not in example:
        raise KeyError(f"TFDS {self.name} example {i} has no {key!r} (keys: {sorted(example)}); "
                       "set --image_key/--caption_key")
    caption = example[self.caption_key]
    if isinstance(caption, bytes):
      caption = caption.decode("utf-8", errors="replace")
    image = example[self.image_key]

    def load(resolution):
      try:
        return images_lib.array_to_model_input(image, resolution, source=f"{self.name}[{i}]")
      except images_lib.BadImageError:
        raise SkipItem("unreadable image") from None

    return Item(f"{self.name}[{i}]", str(caption), load)


# -- encoding -------------------------------------------------------------------------------


class Encoder:
  """Encodes fixed-size batches with the VAE, split over the local devices (one compile)."""

  def __init__(self, vae, batch_size):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devices = jax.local_devices()
    self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
    mesh = Mesh(np.array(devices), ("data",))
    self._in = NamedSharding(mesh, P("data"))
    params = jax.device_put(vae.params, NamedSharding(mesh, P()))
    self.vae = dataclasses.replace(vae, params=params)
    self.num_devices = len(devices)
    self.codes = is_vq(vae)  # a VQ-VAE: int codes [k, h, w] instead of latents

  def __call__(self, images):
    """float32 [k, R, R, 3] (k <= batch_size) -> float32 numpy latents [k, h, w, c]."""
    import jax
    k = len(images)
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
    padded[:k] = images
    encode = self.vae.encode_codes if self.codes else self.vae.encode
    latents = encode(jax.device_put(padded, self._in))
    return np.asarray(jax.device_get(latents))[:k]


def _shard_path(out_dir, shard, num_shards):
  return os.path.join(out_dir, f"image_caption-{shard:05d}-of-{num_shards:05d}"
                      f"{records_lib.EXTENSION}")


def _encode_shard(items, encoder, path, resolution, latent_dtype, progress):
  """Writes one shard; returns its counts {"written", "skipped": {reason: n}, "examples"}."""
  skipped, examples = {}, {}
  pending = []  # (item, image)

  def skip(reason, item):
    skipped[reason] = skipped.get(reason, 0) + 1
    named = examples.setdefault(reason, [])
    if len(named) < EXAMPLES_PER_REASON:
      named.append(item.key)
    progress.update(1)

  with records_lib.RecordWriter(path, options="group_size:1,uncompressed") as writer:
    def flush():
      if not pending:
        return
      latents = encoder(np.stack([img for _, img in pending]))
      for (item, _), latent in zip(pending, latents):
        item_id = item.key if item.id is None else item.id
        if encoder.codes:  # discrete: codes are integers, always finite
          writer.write(records_lib.image_caption_record(codes=latent,
                                                        caption=item.caption.strip(), id=item_id))
          progress.update(1)
          continue
        if not np.isfinite(latent).all():
          skip("non-finite latent", item)
          continue
        latent = latent.astype(latent_dtype)
        if not np.isfinite(latent).all():
          skip(f"latent overflows {np.dtype(latent_dtype).name}", item)
          continue
        writer.write(records_lib.image_caption_record(
            latent, item.caption.strip(), id=item.key if item.id is None else item.id))
        progress.update(1)
      pending.clear()

    for item in items:
      if item.skip:
        skip(item.skip, item)
        continue
      if not item.caption.strip():
        skip("empty caption", item)
        continue
      try:
        pending.append((item, item.load(resolution)))
      except SkipItem as e:
        skip(str(e), item)
        continue
      if len(pending) == encoder.batch_size:
        flush()
    flush()
    count = writer.count
  return {"written": count, "skipped": skipped, "examples": examples}


def _output_files(out_dir):
  """This job's files in out_dir: shards, their counts, partial files and the manifest."""
  names = [n for n in os.listdir(out_dir) if n.startswith("image_caption-") and (
      n.endswith((records_lib.EXTENSION, ".json", ".tmp")))]
  if os.path.exists(os.path.join(out_dir, MANIFEST)):
    names.append(MANIFEST)
  return [os.path.join(out_dir, n) for n in sorted(names)]


def manifest_changes(old, new):
  """What differs between two manifests, as short phrases ([] when they match)."""
  if old.get("format") != MANIFEST_FORMAT:
    return ["the manifest (written by an older tfusion-precompute-latents without input "
            "fingerprints)"]
  changes = []
  for key in ("vae", "resolution", "latent_dtype", "shard_size", "items"):
    if old.get(key) != new.get(key):
      label = _LABELS[key]
      changes.append(label if key == "vae" else f"{label} ({old.get(key)} -> {new.get(key)})")
  old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
  changes += [_LABELS.get(k, k) for k in sorted(set(old_in) | set(new_in))
              if old_in.get(k) != new_in.get(k)]
  return changes


def _prepare_out_dir(out_dir, manifest, overwrite):
  """Checks (or with `overwrite`, clears) out_dir against `manifest`; then records it."""
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, MANIFEST)
  existing = _output_files(out_dir)
  finished = [p for p in existing if p.endswith((records_lib.EXTENSION,
                                                 records_lib.EXTENSION + ".json"))]
  if finished and not overwrite:  # without finished shards there is nothing to keep
    if not os.path.exists(manifest_path):
      raise ValueError(f"{out_dir} holds image_caption shards but no {MANIFEST}, so what they "
                       "were made from is unknown; use --overwrite to replace them, or another "
                       "--out")
    with open(manifest_path, encoding="utf-8") as f:
      old = json.load(f)
    changes = manifest_changes(old, manifest)
    if changes:
      raise ValueError(f"{out_dir} holds latents of another precompute run: "
                       f"{'; '.join(changes)} changed. Use --overwrite (overwrite=True) to "
                       "delete them and encode again, or another --out")
    return
  for path in existing:  # --overwrite: nothing of the old run may survive into the new one
    os.remove(path)
  tmp = manifest_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, manifest_path)


def _await_manifest(out_dir, manifest, overwrite, wait_s):
  """Processes other than 0: wait until process 0 has recorded a manifest equal to ours.

  With `overwrite` an old manifest is waited out (process 0 replaces it); without, a
  different one is refused as on process 0.
  """
  path = os.path.join(out_dir, MANIFEST)
  deadline = time.monotonic() + wait_s
  while True:
    changes = None
    if os.path.exists(path):
      try:
        with open(path, encoding="utf-8") as f:
          changes = manifest_changes(json.load(f), manifest)
      except (json.JSONDecodeError, OSError):
        changes = None  # being replaced right now
    if changes == []:
      return
    if changes and not overwrite:
      raise ValueError(f"{out_dir} holds latents of another precompute run: "
                       f"{'; '.join(changes)} changed. Use --overwrite (overwrite=True) to "
                       "delete them and encode again, or another --out")
    if time.monotonic() > deadline:
      raise ValueError(f"process 0 wrote no matching {MANIFEST} into {out_dir} within "
                       f"{wait_s:.0f} s; start process 0 with the same inputs")
    time.sleep(min(1.0, wait_s / 10))


def _items_in(items, start, stop):
  """Items start..stop-1: streamed by sources that read files in order (`iter_range`), else
  by index."""
  if hasattr(items, "iter_range"):
    return items.iter_range(start, stop)
  return (items[i] for i in range(start, stop))


def shards_of_process(num_shards, process_index, process_count):
  """The shards one process writes: round-robin, shard s to process s % process_count."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return list(range(process_index, num_shards, process_count))


def all_skipped_message(summary, examples):
  """The error when nothing was written: counts by reason with the first items of each."""
  reasons = "; ".join(f"{reason}: {n} ({', '.join(examples.get(reason, []))}"
                      + (", ...)" if n > len(examples.get(reason, [])) else ")")
                      for reason, n in sorted(summary["skipped"].items()))
  return (f"every one of the {sum(summary['skipped'].values())} items was skipped, nothing "
          f"written: {reasons}")


def skipped_lines(summary, examples):
  """One line per skip reason naming its first few items (`examples` from `precompute`)."""
  return [f"skipped ({reason}, {n}x): {', '.join(examples.get(reason, []))}"
          + (", ..." if n > len(examples.get(reason, [])) else "")
          for reason, n in sorted(summary["skipped"].items())]


def precompute(items, vae, out_dir, *, resolution=256, batch_size=32, shard_size=4096,
               latent_dtype="float16", source="", inputs=None, overwrite=False,
               skipped_examples=None, show_progress=True, process_index=0, process_count=1,
               manifest_wait_s=600.0, stats=None):
  """Encodes `items` into record shards in out_dir.

  `items`: a sequence of Item, or a source with len() and `iter_range(start, stop)` that
  streams them (ingest_sources.py); item i goes to shard i // shard_size.
  `inputs`: {name: fingerprint} of what the items are made from (captions, images, dataset);
  with the VAE's fingerprint and the settings it forms the manifest a rerun must match
  (else ValueError naming what changed), unless `overwrite` deletes the old shards first.
  `process_index`/`process_count`: this process writes shards s with s % count == index;
  process 0 checks out_dir and writes the manifest, the others wait (up to manifest_wait_s)
  for an equal one. Counts cover this process's shards.
  `skipped_examples`, a dict, receives {reason: [the first few skipped item keys]}; `stats`,
  a dict, receives {"encoded": items gone through this call, "seconds": their wall time}.
  Returns {"written": n, "skipped": {reason: n}, "shards": S, "shards_done_before": k}.
  Raises ValueError (counts by reason) when items were skipped and none was written.
  """
  from tqdm import tqdm
  if latent_dtype not in records_lib.LATENT_DTYPES:
    raise ValueError(f"latent_dtype must be one of {records_lib.LATENT_DTYPES}")
  if resolution % vae.downsample_factor:
    raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling "
                     f"factor {vae.downsample_factor}")
  total = len(items)
  if total == 0:
    raise ValueError("no images to encode")
  num_shards = math.ceil(total / shard_size)
  grid = [resolution // vae.downsample_factor] * 2
  manifest = {"format": MANIFEST_FORMAT, "vae": vae_fingerprint(vae), "resolution": resolution,
              "latent_dtype": latent_dtype, "shard_size": shard_size, "items": total,
              "inputs": dict(inputs or {}), "source": source}  # source: for people, not compared
  if is_vq(vae):
    manifest["codes"] = {"shape": grid, "codebook_size": vae.num_codes}
    manifest["latent_dtype"] = "codes"
  else:
    manifest["latent_shape"] = grid + [vae.latent_channels]
  mine = shards_of_process(num_shards, process_index, process_count)
  if process_index == 0:
    _prepare_out_dir(out_dir, manifest, overwrite)
  else:
    _await_manifest(out_dir, manifest, overwrite, manifest_wait_s)

  summary = {"written": 0, "skipped": {}, "shards": num_shards, "shards_done_before": 0}
  examples = {} if skipped_examples is None else skipped_examples

  def add(counts):
    summary["written"] += counts["written"]
    for k, v in counts["skipped"].items():
      summary["skipped"][k] = summary["skipped"].get(k, 0) + v
    for k, named in counts.get("examples", {}).items():
      kept = examples.setdefault(k, [])
      kept.extend(named[:EXAMPLES_PER_REASON - len(kept)])

  todo = []
  for s in mine:
    path = _shard_path(out_dir, s, num_shards)
    if os.path.exists(path) and os.path.exists(path + ".json"):
      with open(path + ".json", encoding="utf-8") as f:
        add(json.load(f))
      summary["shards_done_before"] += 1
    else:
      todo.append(s)
  def size(s):
    return min(shard_size, total - s * shard_size)

  done_items = sum(size(s) for s in mine if s not in todo)
  encoder = Encoder(vae, batch_size) if todo else None
  # tqdm's rate is the images/s of this run (it starts counting at `initial`).
  start_time = time.perf_counter()
  with tqdm(total=sum(size(s) for s in mine), initial=done_items, unit="img",
            disable=not show_progress, desc="encoding") as progress:
    for s in todo:
      path = _shard_path(out_dir, s, num_shards)
      shard_items = _items_in(items, s * shard_size, min(total, (s + 1) * shard_size))
      counts = _encode_shard(shard_items, encoder, path, resolution, np.dtype(latent_dtype),
                             progress)
      # Counts first, then the shard's final name: a shard that exists is complete.
      with open(path + ".json.tmp", "w", encoding="utf-8") as f:
        json.dump(counts, f)
      os.replace(path + ".json.tmp", path + ".json")
      add(counts)
  if stats is not None:
    stats.update(encoded=sum(size(s) for s in todo), seconds=time.perf_counter() - start_time)
  if summary["written"] == 0 and summary["skipped"]:
    raise ValueError(all_skipped_message(summary, examples))
  return summary


def _array_item_loader(image, where, resolution):
  from tfusion.vae import images as images_lib
  try:
    return images_lib.array_to_model_input(image, resolution, source=where)
  except images_lib.BadImageError:
    raise SkipItem("unreadable image") from None


def _arrays_fingerprints(images, captions):
  """{"images": hash of the arrays, "captions": hash of the captions} for the manifest."""
  def image_parts():
    for image in images:
      a = np.ascontiguousarray(image)
      yield f"{a.dtype.str}{a.shape}"
      yield a.tobytes()
  return {"images": content_hash(image_parts()), "captions": content_hash(repr(c) for c in captions)}


def write_latent_records(images, captions, vae, out_dir, *, resolution=256, batch_size=32,
                         shard_size=4096, latent_dtype="float16", overwrite=False,
                         show_progress=False):
  """In-memory images + captions -> image–caption record shards in out_dir (demo, notebooks).

  images: N arrays [H, W] or [H, W, 1|3|4], uint8 or float in [0, 1], any size (center-cropped
  and resized to `resolution`), e.g. one array [N, H, W, 3]. captions: N strings. Encoded
  with `vae` exactly as tfusion-precompute-latents does (same shards and manifest, same skips:
  empty captions, unusable arrays, non-finite latents). Rerunning with the same arrays skips
  finished shards; different arrays, captions or VAE into the same out_dir are an error
  naming what changed, unless `overwrite` (the old shards are deleted first).
  Returns {"written", "skipped": {reason: n}, "shards", "shards_done_before"} (`precompute`).
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  items = [Item(f"array[{i}]", caption if isinstance(caption, str) else "",
                functools.partial(_array_item_loader, image, f"array[{i}]"))
           for i, (image, caption) in enumerate(zip(images, captions))]
  return precompute(items, vae, out_dir, resolution=resolution, batch_size=batch_size,
                    shard_size=shard_size, latent_dtype=latent_dtype, source="arrays",
                    inputs=_arrays_fingerprints(images, captions), overwrite=overwrite,
                    show_progress=show_progress)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description="Images + captions -> VAE latents in image–caption ArrayRecord shards.")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--vae", help="VAE directory (diffusers format): continuous latents")
  which.add_argument("--vq", help="VQ-VAE directory (tfusion-train-vae --quantizer vq): "
                     "discrete codes, for config.model.image.representation=discrete")
  parser.add_argument("--out", required=True, help="output directory for the shards")
  parser.add_argument("--images", help="folder of images (with --captions)")
  parser.add_argument("--captions", help="captions .jsonl ({file, caption}) or .csv")
  parser.add_argument("--webdataset", help="webdataset/img2dataset .tar shards: a directory, "
                      "glob or comma list")
  parser.add_argument("--parquet", help="parquet files (directory, glob or comma list) with "
                      "--image_column and --caption_column")
  parser.add_argument("--image_column", default="image",
                      help="parquet image column: HF Image struct {bytes, path}, or binary")
  parser.add_argument("--caption_column", default=None,
                      help="parquet caption column (default: 'caption', else 'text')")
  parser.add_argument("--coco", help="COCO captions JSON (captions_train2017.json), with "
                      "--images")
  parser.add_argument("--karpathy", help="Karpathy dataset_coco.json: the images of --split "
                      "(train, val, test, restval; comma list), with --images")
  parser.add_argument("--tfds", help="TFDS dataset name, prepared in --data_dir")
  parser.add_argument("--data_dir", help="TFDS data_dir")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_key", default="image")
  parser.add_argument("--caption_key", default="caption",
                      help="TFDS caption feature; webdataset .json caption field")
  parser.add_argument("--resolution", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32,
                      help="images per encode call (rounded up to a multiple of the devices)")
  parser.add_argument("--shard_size", type=int, default=4096, help="items per output shard")
  parser.add_argument("--latent_dtype", default="float16", choices=records_lib.LATENT_DTYPES)
  parser.add_argument("--overwrite", action="store_true",
                      help="--out holds latents of other inputs: delete them and encode again")
  parser.add_argument("--process_index", type=int, default=None,
                      help="this host's index (default: jax.process_index())")
  parser.add_argument("--process_count", type=int, default=None,
                      help="hosts sharing the job; shard s is written by host s %% count "
                      "(default: jax.process_count())")
  args = parser.parse_args(argv)
  from tfusion import logs
  logs.setup_console()
  from tfusion.data import ingest_sources
  eval_images = None  # COCO: the references and prompts written beside the shards
  try:
    if args.webdataset:
      items = ingest_sources.WebDatasetItems(args.webdataset, args.caption_key)
      source, inputs = f"webdataset:{args.webdataset}", items.inputs()
    elif args.parquet:
      items = ingest_sources.ParquetItems(args.parquet, args.image_column, args.caption_column)
      source, inputs = f"parquet:{args.parquet}", items.inputs()
    elif (args.coco or args.karpathy) and args.images:
      items, inputs, eval_images = ingest_sources.coco_items(
          args.images, args.coco, args.karpathy, args.split)
      source = f"coco:{args.coco or ''}+{args.karpathy or ''}[{args.split}]@{args.images}"
    elif args.tfds:
      items = TfdsItems(args.tfds, args.data_dir, args.split, args.image_key, args.caption_key)
      source = f"tfds:{args.tfds}/{args.split}@{args.data_dir}"
      inputs = {"dataset": f"{source} [{args.image_key}, {args.caption_key}] x{len(items)}"}
    elif args.images and args.captions:
      items = folder_items(args.images, args.captions)
      source = f"folder:{os.path.abspath(args.images)}+{os.path.abspath(args.captions)}"
      inputs = folder_fingerprints(args.images, args.captions)
    else:
      parser.error("give --images and --captions, --webdataset, --parquet, --coco/--karpathy "
                   "and --images, or --tfds and --data_dir")
    from tfusion.vae import load_vae
    flag, path = ("--vq", args.vq) if args.vq else ("--vae", args.vae)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{flag} {path!r} does not exist (a diffusers-format "
                              f"{'VQ-VAE' if args.vq else 'VAE'} directory; nothing is "
                              "downloaded)")
    if args.vq:
      from tfusion.vae.vq import load_vq
      vae = load_vq(path)
    else:
      vae = load_vae(path)
    import jax  # after load_vae: the backend (and jax.distributed, if initialised) is up
    index = jax.process_index() if args.process_index is None else args.process_index
    count = jax.process_count() if args.process_count is None else args.process_count
    examples, stats = {}, {}
    summary = precompute(items, vae, args.out, resolution=args.resolution,
                         batch_size=args.batch_size, shard_size=args.shard_size,
                         latent_dtype=args.latent_dtype, source=source, inputs=inputs,
                         overwrite=args.overwrite, skipped_examples=examples,
                         process_index=index, process_count=count, stats=stats)
    if eval_images is not None and index == 0:
      ingest_sources.write_eval_files(eval_images, args.out)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"tfusion-precompute-latents: error: {e}", file=sys.stderr)
    sys.exit(2)
  for line in skipped_lines(summary, examples):
    print(line)
  if stats["encoded"]:
    print(f"encoded {stats['encoded']} items in {stats['seconds']:.1f} s: "
          f"{stats['encoded'] / stats['seconds']:.1f} images/s"
          + (f" (process {index} of {count})" if count > 1 else ""))
  if eval_images is not None and index == 0:
    print(f"wrote references.jsonl ({len(eval_images)} images) and prompts.jsonl to {args.out}")
  skipped = sum(summary["skipped"].values())
  reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["skipped"].items())) or "none"
  shards = f"{summary['shards']} shards" if count == 1 else (
      f"{len(shards_of_process(summary['shards'], index, count))} of {summary['shards']} shards")
  print(f"wrote {summary['written']} image–caption records in {shards} to "
        f"{args.out} ({summary['shards_done_before']} shards were already done); skipped "
        f"{skipped} ({reasons})")


if __name__ == "__main__":
  main()
