"""The Grain pipeline: ArrayRecord sources -> documents -> packed batches (the contract).

Per source (text, image_caption, interleaved):
  RecordSource -> MapDataset -> this process's records [p::P] -> shuffle (per epoch, from the
  seed) -> repeat -> random_map(DocumentBuilder) (order/dropout from (seed, stream index)).
Then one IterDataset mixes the sources by weight and packs rows (tfusion/data/packing.py): the
source furthest behind its share of packed text tokens (text, interleaved: positions) or image
patches (image_caption) places the next piece. Batches hold this process's rows; optional
Grain worker processes and a prefetch thread follow.

Everything is a function of (config.seed, position in the stream): the iterator state is a
few integers per source plus references (stream index, packed offset) to the documents open
in the packing pools, JSON-serializable and restored by re-reading those records, so a resumed run
sees exactly the batches an uninterrupted one would have seen. Processes read disjoint record
shards that together cover every record once per epoch.
"""

import functools
import json
import logging
import os

import grain
import numpy as np

from tfusion import discrete as discrete_lib
from tfusion.data import documents as documents_lib
from tfusion.data import packing as packing_lib
from tfusion.data import records as records_lib
from tfusion.data import tokenizer as tokenizer_lib

SOURCE_KINDS = ("text", "image_caption", "interleaved")
STATE_TAG = "tfusion_packer"
MAX_BAD_IN_A_ROW = 1000


def layout_spec(config, tokenizer):
  """Checks the config against the tokenizer; returns the documents' LayoutSpec."""
  img = config.model.image
  if discrete_lib.is_discrete(config.model):
    if config.model.vocab_size < tokenizer.vocab_size:
      raise ValueError(
          f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
          f"vocabulary ({tokenizer.vocab_size} ids incl. <boi>/<eoi>) of config.data.tokenizer="
          f"{tokenizer.source!r}; raise config.model.vocab_size")
    discrete_lib.check_vocab(config.model, tokenizer.vocab_size,
                             what=f"the tokenizer config.data.tokenizer={tokenizer.source!r}")
    return documents_lib.LayoutSpec(
        bos=tokenizer.bos_id, eos=tokenizer.eos_id, boi=tokenizer.boi_id, eoi=tokenizer.eoi_id,
        vocab_size=tokenizer.vocab_size, latent_shape=discrete_lib.code_shape(config.model),
        num_patches=discrete_lib.num_image_tokens(config.model), representation="discrete",
        codebook_size=discrete_lib.codebook_size(config.model),
        image_token_offset=discrete_lib.image_token_offset(config.model))
  if img.latent_size % img.patch_size:
    raise ValueError(f"config.model.image.latent_size={img.latent_size} is not divisible by "
                     f"config.model.image.patch_size={img.patch_size}")
  if config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
        f"vocabulary ({tokenizer.vocab_size} ids incl. <boi>/<eoi>) of config.data.tokenizer="
        f"{tokenizer.source!r}; raise config.model.vocab_size")
  num_patches = (img.latent_size // img.patch_size) ** 2
  return documents_lib.LayoutSpec(
      bos=tokenizer.bos_id, eos=tokenizer.eos_id, boi=tokenizer.boi_id, eoi=tokenizer.eoi_id,
      vocab_size=tokenizer.vocab_size,
      latent_shape=(img.latent_size, img.latent_size, img.latent_channels),
      num_patches=num_patches)


def _seed(config, *parts):
  return int(np.random.SeedSequence([int(config.seed) & 0xFFFFFFFF, *parts])
             .generate_state(1)[0])


def config_model_stub(spec):
  """The config.model keys check_codebook names, rebuilt from a discrete LayoutSpec."""
  import ml_collections
  return ml_collections.ConfigDict({
      "vocab_size": spec.image_token_offset + spec.codebook_size,
      "image": {"codebook_size": spec.codebook_size}})


def _check_first_latent(source, key, spec):
  """A whole source with another latent shape, or images of the other representation
  (latents vs VQ codes), is a config mismatch: say so at start-up."""
  raw = source[0]
  try:
    rec = records_lib.decode_record(raw.data, where=raw.where)
  except records_lib.BadRecordError:
    return  # a single bad record is the reader's business
  held = [k for k in records_lib.IMAGE_KEYS if k in rec] + [
      k for s in rec.get("segments", []) for k in records_lib.IMAGE_KEYS if k in s]
  want = "codes" if spec.discrete else "latent"
  for k in held[:1]:
    if k != want:
      what = "VQ codes (discrete images)" if k == "codes" else "VAE latents (continuous images)"
      raise ValueError(
          f"{key} holds {what} ({raw.where}) but config.model.image.representation="
          f"{spec.representation!r}: set config.model.image.representation="
          f"{'discrete' if k == 'codes' else 'continuous'!r} (and its codebook_size / vocab_size),"
          f" or precompute {'with --vq' if spec.discrete else 'with --vae'}")
  if spec.discrete:
    manifest = os.path.join(os.path.dirname(raw.path), "precompute.json")  # tfusion-precompute
    if os.path.exists(manifest):
      with open(manifest, encoding="utf-8") as f:
        made = json.load(f).get("codes") or {}
      if "codebook_size" in made:
        discrete_lib.check_codebook(
            config_model_stub(spec), made["codebook_size"],
            f"{key}: the VQ-VAE of {manifest}")
    codes = [rec["codes"]] if "codes" in rec else [
        s["codes"] for s in rec.get("segments", []) if "codes" in s]
    for c in codes[:1]:
      if tuple(c.shape) != spec.latent_shape:
        raise ValueError(
            f"{key} holds codes of shape {list(c.shape)} ({raw.where}); the model expects "
            f"{list(spec.latent_shape)} (config.model.image.latent_size={spec.latent_shape[0]})")
    return
  latents = [rec["latent"]] if "latent" in rec else [
      s["latent"] for s in rec.get("segments", []) if "latent" in s]
  h, w, c = spec.latent_shape
  for latent in latents[:1]:
    if tuple(latent.shape) != spec.latent_shape:
      raise ValueError(
          f"{key} holds latents of shape {list(latent.shape)} ({raw.where}); the model expects "
          f"[{h}, {w}, {c}] (config.model.image.latent_size={h}, latent_channels={c})")


def build_sources(config, *, process_index=0, process_count=1, tokenizer=None):
  """This process's per-source MapDatasets of Documents (or BadRecords in skip mode).

  Returns (kinds, weights, datasets, fingerprint, spec). Missing or empty sources, a bad
  tokenizer or a config the data cannot feed are errors here, at start-up.
  """
  d = config.data
  tokenizer = tokenizer or tokenizer_lib.load_tokenizer(d.tokenizer)
  spec = layout_spec(config, tokenizer)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  for key in ("caption_first_prob", "caption_dropout"):
    if not 0 <= d[key] <= 1:
      raise ValueError(f"config.data.{key}={d[key]} is not a probability")
  if not 0 < d.image_first_max_t <= 1:
    raise ValueError(f"config.data.image_first_max_t={d.image_first_max_t} must be in (0, 1]")
  kinds, weights, datasets, fingerprint = [], [], [], []
  for index, kind in enumerate(SOURCE_KINDS):
    paths, weight = d[kind], float(d[f"{kind}_weight"])
    if not paths:
      continue
    if weight < 0:
      raise ValueError(f"config.data.{kind}_weight={weight} is negative")
    if weight == 0:
      continue
    key = f"config.data.{kind}"
    source = records_lib.RecordSource(records_lib.resolve_paths(paths, key), key=key)
    if len(source) < process_count:
      raise ValueError(f"{key} holds {len(source)} records, fewer than the {process_count} "
                       "processes reading it")
    if kind != "text":
      if d.max_images < 1 and not spec.discrete:
        raise ValueError(f"config.data.max_images={d.max_images}: {key} has images")
      if spec.num_patches + 4 > d.seq_len:
        unit = "image tokens" if spec.discrete else "patches"
        fix = ("the VQ code grid (config.model.image.latent_size)" if spec.discrete
               else "the patch size (config.model.image.patch_size)")
        raise ValueError(
            f"an image document needs at least {spec.num_patches + 4} positions (BOS, BOI, "
            f"{spec.num_patches} {unit}, EOI, EOS) but config.data.seq_len={d.seq_len}; raise "
            f"it or shrink {fix}")
      _check_first_latent(source, key, spec)
    builder = documents_lib.DocumentBuilder(
        kind, tokenizer, spec, caption_first_prob=d.caption_first_prob,
        caption_dropout=d.caption_dropout, image_first_max_t=d.image_first_max_t,
        on_bad_record=d.on_bad_record)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if d.shuffle:
      ds = ds.shuffle(seed=_seed(config, index, 0))
    ds = ds.repeat(d.num_epochs or None)
    ds = ds.random_map(builder, seed=_seed(config, index, 1))
    kinds.append(kind)
    weights.append(weight)
    datasets.append(ds)
    fingerprint.append([kind, len(source.paths), len(source)])
  if not datasets:
    raise ValueError("source='grain' needs at least one of config.data.text, "
                     "config.data.image_caption, config.data.interleaved with a weight > 0")
  fingerprint = {"sources": fingerprint, "process": [process_index, process_count]}
  return kinds, weights, datasets, fingerprint, spec


class PackedBatches(grain.IterDataset):
  """IterDataset: mixes document sources by weight and packs them into batches of `rows`."""

  def __init__(self, datasets, *, kinds, weights, rows, packer_args, fingerprint):
    super().__init__(list(datasets))
    self.datasets = list(datasets)
    self.kinds = list(kinds)
    self.weights = list(weights)
    self.rows = rows
    self.packer_args = dict(packer_args)
    self.fingerprint = fingerprint
    self.worker_slice = [0, 1]

  def set_slice(self, sl, sequential_slice=False):
    """Grain worker processes: this worker reads every sl.step-th document of each source."""
    if sequential_slice:
      raise ValueError("sequential_slice is not supported (sources repeat forever)")
    self.datasets = [ds.slice(sl) for ds in self.datasets]
    self.worker_slice = [sl.start or 0, sl.step or 1]

  def __iter__(self):
    return PackedBatchesIterator(self)

  def __str__(self):
    return f"PackedBatches(kinds={self.kinds}, weights={self.weights}, rows={self.rows})"


class PackedBatchesIterator(grain.DatasetIterator):
  """Packs documents pulled from the sources; state = stream positions + pool references."""

  def __init__(self, ds):
    super().__init__()
    self._ds = ds
    n = len(ds.datasets)
    self._next = [0] * n  # next stream index per source
    self._bad_run = [0] * n
    self._skipped = {}  # by reason (BadRecord.code)
    self._skipped_sources = {}  # by source kind
    self._batches = 0
    measures = ["patches" if k == "image_caption" else "positions" for k in ds.kinds]
    self._packer = packing_lib.Packer(weights=ds.weights, measures=measures, **ds.packer_args)
    self._pulls = [functools.partial(self._pull, s) for s in range(n)]

  def _pull(self, s):
    """The next good document of source s, or None at its end."""
    ds = self._ds.datasets[s]
    while True:
      i = self._next[s]
      if i >= len(ds):
        return None
      item = ds[i]
      self._next[s] = i + 1
      if isinstance(item, documents_lib.BadRecord):
        self._count_bad(s, item)
        continue
      self._bad_run[s] = 0
      item.origin = i
      return item

  def _count_bad(self, s, bad):
    self._skipped[bad.code] = self._skipped.get(bad.code, 0) + 1
    kind = self._ds.kinds[s]
    self._skipped_sources[kind] = self._skipped_sources.get(kind, 0) + 1
    self._bad_run[s] += 1
    documents_lib.log_bad_record(bad, sum(self._skipped.values()))
    limit = min(MAX_BAD_IN_A_ROW, self._ds.fingerprint["sources"][s][2])
    if self._bad_run[s] >= limit:
      raise ValueError(f"the last {self._bad_run[s]} records of config.data.{self._ds.kinds[s]}"
                       f" were all bad (last: {bad.where}: {bad.reason}); check the data and "
                       "the config (latent shape, tokenizer)")

  def __next__(self):
    batch, _ = self._packer.next_rows(self._ds.rows, self._pulls)
    if batch is None:
      raise StopIteration
    self._batches += 1
    return batch

  def get_state(self):
    p = self._packer
    return {
        STATE_TAG: 1,
        "fingerprint": self._ds.fingerprint,
        "worker_slice": list(self._ds.worker_slice),
        "next": list(self._next),
        "packed": list(p.packed),
        "exhausted": list(p.exhausted),
        "bad_run": list(self._bad_run),
        "skipped": dict(self._skipped),
        "skipped_sources": dict(self._skipped_sources),
        "batches": self._batches,
        # Documents still open in the pools: (stream index, packed offset) per source.
        "pools": [[[e.doc.origin, e.offset] for e in pool] for pool in p.pools],
    }

  def set_state(self, state):
    if state.get(STATE_TAG) != 1:
      raise ValueError(f"not a tfusion data iterator state: keys {sorted(state)}")
    saved = state["fingerprint"]
    now = self._ds.fingerprint
    if json.dumps(saved) != json.dumps(now):
      raise ValueError(
          f"the data iterator state was saved for sources {saved['sources']} read as process "
          f"{saved['process'][0]} of {saved['process'][1]}; now the sources are "
          f"{now['sources']} and this is process {now['process'][0]} of {now['process'][1]}: "
          "the saved stream positions do not apply")
    if list(state["worker_slice"]) != list(self._ds.worker_slice):
      raise ValueError(f"the data iterator state is for worker slice {state['worker_slice']}, "
                       f"this is {self._ds.worker_slice} (config.data.worker_count changed?)")
    p = self._packer
    self._next = [int(x) for x in state["next"]]
    p.packed = [int(x) for x in state["packed"]]
    p.exhausted = [bool(x) for x in state["exhausted"]]
    self._bad_run = [int(x) for x in state["bad_run"]]
    self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}
    self._skipped_sources = {str(k): int(v)
                             for k, v in state.get("skipped_sources", {}).items()}
    self._batches = int(state["batches"])
    p.pools = [[] for _ in p.pools]
    for s, pool in enumerate(state["pools"]):
      for i, offset in pool:
        doc = self._ds.datasets[s][i]
        if not isinstance(doc, documents_lib.Document):
          raise ValueError(f"the data iterator state refers to record {i} of source "
                           f"{self._ds.kinds[s]}, which is now bad: {doc}")
        doc.origin = i
        p.add(s, doc, offset)


def make_dataset(config, *, process_index=0, process_count=1, tokenizer=None):
  """The Grain IterDataset of this process's batches (dicts of numpy arrays)."""
  d = config.data
  if d.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={d.batch_size} is not divisible by the "
                     f"{process_count} processes")
  kinds, weights, datasets, fingerprint, spec = build_sources(
      config, process_index=process_index, process_count=process_count, tokenizer=tokenizer)
  _warn_if_slots_limit(config, kinds, weights, spec)
  ds = PackedBatches(
      datasets, kinds=kinds, weights=weights, rows=d.batch_size // process_count,
      packer_args=dict(seq_len=d.seq_len, max_images=d.max_images,
                       latent_shape=spec.latent_shape, num_patches=spec.num_patches,
                       pool_size=d.pack_pool, split_text=d.split_text,
                       discrete=spec.discrete),
      fingerprint=fingerprint)
  if d.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (their defaults suffice)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count,
                                                     per_worker_buffer_size=2))
  if d.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=d.prefetch)
  return ds


def _warn_if_slots_limit(config, kinds, weights, spec):
  """Rows hold at most M images: warn when the mix asks for more patches than that."""
  d = config.data
  if spec.discrete:
    return  # discrete images take no slots
  image_share = sum(w for k, w in zip(kinds, weights) if k != "text") / sum(weights)
  if image_share and d.max_images * (spec.num_patches + 2) < 0.9 * image_share * d.seq_len:
    logging.warning(
        "config.data.max_images=%d image slots hold %d of %d positions per row, but the mix "
        "asks for about %.0f%% image documents: rows will be short of images (padded, or the mix "
        "drifts toward text). "
        "Raise config.data.max_images to about %d.", d.max_images,
        d.max_images * (spec.num_patches + 2), d.seq_len, 100 * image_share,
        int(np.ceil(image_share * d.seq_len / (spec.num_patches + 2))) + 1)


def _find_states(state):
  if isinstance(state, dict):
    if state.get(STATE_TAG) == 1:
      yield state
      return
    for v in state.values():
      yield from _find_states(v)
  elif isinstance(state, (list, tuple)):
    for v in state:
      yield from _find_states(v)
  elif isinstance(state, (str, bytes)):
    try:
      yield from _find_states(json.loads(state))
    except (ValueError, TypeError):
      return


class DataIterator:
  """next() -> this process's rows of the next global batch; get_state/set_state to resume."""

  def __init__(self, dataset):
    self.dataset = dataset
    self._it = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self):
    """JSON-serializable state (Grain DatasetIterator semantics: after the last next())."""
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)

  def metrics(self):
    """Counters for logs/metrics: skipped bad records (by reason, by source) and batches
    packed, since the start of the run (they travel in the iterator state)."""
    skipped, sources, batches = {}, {}, 0
    for s in _find_states(self.get_state()):
      batches += s["batches"]
      for k, v in s["skipped"].items():
        skipped[k] = skipped.get(k, 0) + v
      for k, v in s.get("skipped_sources", {}).items():
        sources[k] = sources.get(k, 0) + v
    out = {"data/skipped_records": sum(skipped.values()), "data/batches": batches}
    out.update({f"data/skipped_{k}": v for k, v in sorted(skipped.items())})
    out.update({f"data/skipped_source_{k}": v for k, v in sorted(sources.items())})
    return out

  def close(self):
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_iterator(config, *, process_index=0, process_count=1, tokenizer=None):
  """This process's share of each global batch (config.data.batch_size / process_count rows).

  Returns a `DataIterator`: next() -> dict of numpy arrays per the batch contract;
  get_state() -> JSON-serializable state; set_state(state) resumes exactly there.
  """
  return DataIterator(make_dataset(config, process_index=process_index,
                                   process_count=process_count, tokenizer=tokenizer))
