"""Records -> token layouts: one `Document` per record, ready to be packed.

A document is BOS, its pieces, EOS. Text pieces are token ids; an image is BOI, N patch
positions (token 0) and EOI, its latent kept beside the tokens. With discrete images
(config.model.image.representation="discrete", tfusion/discrete.py) an image is BOI, its n VQ
codes as image tokens (offset + code) and EOI: plain tokens, no latent; `image_starts` still
marks the spans, so packing never cuts an image and counts its tokens like patches. Image–caption pairs are
caption-first (text-to-image) with probability `caption_first_prob`, else image-first
(captioning, diffusion time limited to `image_first_max_t`); a caption-first pair loses its
caption with probability `caption_dropout` (the unconditional examples of classifier-free
guidance). The random choices come from a generator seeded by (seed, position in the stream).
"""

import dataclasses
import logging

import grain
import numpy as np

from tfusion.data import records as records_lib


class Document:
  """Token layout of one document.

  tokens: int32 [n] (0 at patch positions; image tokens in discrete mode); image_starts: int32
  [k] first patch (code) position of each image; latents: [k, h, w, c] ([0] when discrete);
  max_t: float32 [k]; origin: (source, stream index).
  """

  __slots__ = ("tokens", "image_starts", "latents", "max_t", "origin")

  def __init__(self, tokens, image_starts, latents, max_t, origin=None):
    self.tokens = tokens
    self.image_starts = image_starts
    self.latents = latents
    self.max_t = max_t
    self.origin = origin

  def __len__(self):
    return len(self.tokens)

  @property
  def num_images(self):
    return len(self.image_starts)


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that failed validation (kept, in skip mode, to be counted by the packer)."""
  where: str
  reason: str
  code: str


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
  """What the model expects: special ids, vocabulary, latent shape, patches per image."""
  bos: int
  eos: int
  boi: int
  eoi: int
  vocab_size: int
  latent_shape: tuple  # (h, w, c); discrete: the code grid (h, w)
  num_patches: int  # patches per image; discrete: codes per image
  representation: str = "continuous"  # | "discrete"
  codebook_size: int = 0  # discrete: codes are [0, codebook_size)
  image_token_offset: int = 0  # discrete: token = image_token_offset + code

  @property
  def discrete(self):
    return self.representation == "discrete"


class DocumentBuilder(grain.transforms.RandomMap):
  """Grain random_map transform: RawRecord -> Document (or BadRecord in skip mode)."""

  def __init__(self, kind, tokenizer, spec, *, caption_first_prob=0.8, caption_dropout=0.1,
               image_first_max_t=0.5, on_bad_record="error"):
    if on_bad_record not in ("error", "skip"):
      raise ValueError(f"config.data.on_bad_record must be 'error' or 'skip', got "
                       f"{on_bad_record!r}")
    self.kind = kind
    self.tokenizer = tokenizer
    self.spec = spec
    self.caption_first_prob = caption_first_prob
    self.caption_dropout = caption_dropout
    self.image_first_max_t = image_first_max_t
    self.on_bad_record = on_bad_record
    self._special = np.array([spec.bos, spec.eos, spec.boi, spec.eoi])
    self._image_block = np.zeros(spec.num_patches + 2, np.int32)
    self._image_block[0], self._image_block[-1] = spec.boi, spec.eoi

  def random_map(self, raw, rng):
    try:
      rec = records_lib.decode_record(raw.data, where=raw.where)
      return self.build(rec, rng, raw.where)
    except records_lib.BadRecordError as e:
      if self.on_bad_record == "error":
        raise
      return BadRecord(e.where, e.reason, e.code)

  # -- pieces -------------------------------------------------------------------------------

  def _bad(self, where, reason, code):
    return records_lib.BadRecordError(where, reason, code)

  def _ids(self, ids, where, what):
    ids = np.asarray(ids)
    if ids.max() >= self.spec.vocab_size:
      raise self._bad(where, f"{what} holds id {int(ids.max())} >= the tokenizer's vocabulary "
                      f"size {self.spec.vocab_size}", "ids")
    special = np.isin(ids, self._special)
    if special.any():
      at = int(np.flatnonzero(special)[0])
      raise self._bad(where, f"{what} holds the special id {int(ids[at])} (BOS/EOS/BOI/EOI) at "
                      f"offset {at}; the pipeline adds those itself", "ids")
    return ids.astype(np.int32)

  def _text(self, text):
    return np.asarray(self.tokenizer.encode(text), np.int32)

  def _image(self, key, value, where, what):
    """A record's image (`key` "latent" or "codes") -> the piece _assemble takes."""
    from tfusion.vae import quantizer
    spec = self.spec
    want = "codes" if spec.discrete else "latent"
    if key != want:
      held = "VQ codes (discrete images)" if key == "codes" else "VAE latents (continuous images)"
      raise self._bad(where, f"{what} holds {held} but config.model.image.representation="
                      f"{spec.representation!r}; set it to "
                      f"{'discrete' if key == 'codes' else 'continuous'!r} or use records with "
                      f"{want}", "representation")
    if not spec.discrete:
      return self._latent(value, where, what)
    if tuple(value.shape) != spec.latent_shape:
      h, w = spec.latent_shape
      raise self._bad(where, f"{what} has shape {list(value.shape)}; the model expects [{h}, "
                      f"{w}] codes (config.model.image.latent_size={h})", "latent_shape")
    try:
      quantizer.check_codes(value, spec.codebook_size,
                            f"{what} (config.model.image.codebook_size={spec.codebook_size})")
    except ValueError as e:
      raise self._bad(where, str(e), "codes") from None
    return _Codes(value)

  def _latent(self, latent, where, what):
    if tuple(latent.shape) != self.spec.latent_shape:
      h, w, c = self.spec.latent_shape
      raise self._bad(where, f"{what} has shape {list(latent.shape)}; the model expects "
                      f"[{h}, {w}, {c}] (config.model.image.latent_size={h}, "
                      f"latent_channels={c})", "latent_shape")
    return latent

  # -- documents ----------------------------------------------------------------------------

  def build(self, rec, rng, where):
    """A validated record -> Document."""
    if rec["kind"] != self.kind:
      raise self._bad(where, f"a {rec['kind']!r} record in a {self.kind!r} source", "wrong_kind")
    if self.kind == "text":
      if "text" in rec:
        body = self._text(rec["text"])
        if body.size == 0:
          raise self._bad(where, "text tokenizes to nothing", "empty_text")
      else:
        body = self._ids(rec["ids"], where, "ids")
      return self._assemble([body], where)
    if self.kind == "image_caption":
      key = "latent" if "latent" in rec else "codes"
      latent = self._image(key, rec[key], where, key)
      caption = self._text(rec["caption"].strip())
      if caption.size == 0:
        raise self._bad(where, "caption tokenizes to nothing", "empty_caption")
      if rng.random() < self.caption_first_prob:
        if rng.random() < self.caption_dropout:
          return self._assemble([latent], where)
        return self._assemble([caption, latent], where)
      return self._assemble([latent, caption], where, first_image_max_t=self.image_first_max_t)
    pieces = []
    for i, seg in enumerate(rec["segments"]):
      if "text" in seg:
        pieces.append(self._text(seg["text"]))
      elif "ids" in seg:
        pieces.append(self._ids(seg["ids"], where, f"segment {i} ids"))
      else:
        (key, value), = seg.items()
        pieces.append(self._image(key, value, where, f"segment {i} {key}"))
    return self._assemble(pieces, where)

  def _assemble(self, pieces, where, first_image_max_t=1.0):
    """pieces: int32 id arrays (text), float latents [h, w, c] or _Codes [h, w] (images)."""
    parts = [np.array([self.spec.bos], np.int32)]
    starts, latents = [], []
    cursor = 1
    for piece in pieces:
      if isinstance(piece, _Codes):
        block = self._image_block.copy()
        block[1:-1] = piece.codes.reshape(-1).astype(np.int64) + self.spec.image_token_offset
        parts.append(block)
        starts.append(cursor + 1)
        cursor += len(block)
      elif piece.dtype.kind == "f":
        parts.append(self._image_block)
        starts.append(cursor + 1)
        latents.append(piece)
        cursor += len(self._image_block)
      elif piece.size:
        parts.append(piece)
        cursor += piece.size
    parts.append(np.array([self.spec.eos], np.int32))
    tokens = np.concatenate(parts)
    max_t = np.ones(len(starts), np.float32)
    if self.spec.discrete:
      max_t[:1] = first_image_max_t  # unused by the model; kept for the layout's bookkeeping
      latents = np.zeros((0,), np.float32)
    elif latents:
      max_t[0] = first_image_max_t
      latents = np.stack(latents)
    else:
      latents = np.zeros((0,) + self.spec.latent_shape, np.float16)
    return Document(tokens, np.asarray(starts, np.int32), latents, max_t)


class _Codes:
  """A discrete image piece (VQ codes [h, w]) on its way into a document."""
  __slots__ = ("codes",)
  size = 1

  def __init__(self, codes):
    self.codes = np.asarray(codes)


def log_bad_record(bad, count):
  """Warns about skipped records: the first 10, then every 1000th."""
  if count <= 10 or count % 1000 == 0:
    logging.warning("skipped bad record #%d: %s: %s", count, bad.where, bad.reason)
