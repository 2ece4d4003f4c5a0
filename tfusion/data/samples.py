"""Small real data shipped with Python, as records: for tests, benchmarks and the demo.

Text comes from CPython itself (the pydoc topic pages, the standard library's sources);
image–caption pairs get random latents with short captions. No downloads.
"""

import glob
import os
import sysconfig

import numpy as np

from tfusion.data import records as records_lib
from tfusion.data import tokenizer as tokenizer_lib


def pydoc_topics():
  """[(name, text)] of CPython's pydoc topic pages (79 documents, ~0.5 MB)."""
  from pydoc_data import topics
  return sorted(topics.topics.items())


def stdlib_sources(limit=None):
  """[(name, text)] of the standard library's top-level .py files, sorted by name."""
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:limit]
  out = []
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if text.strip():
      out.append((os.path.basename(path), text))
  return out


def write_text_file(path, texts):
  """One paragraph per line (what the SentencePiece trainer reads)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for _, text in texts:
      for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para:
          f.write(para + "\n")
  return path


def sample_tokenizer(workdir, vocab_size=1000, texts=None):
  """Trains (once) a tokenizer on `texts` (default: pydoc topics) into workdir/tokenizer.model."""
  prefix = os.path.join(workdir, "tokenizer")
  if os.path.exists(prefix + ".model"):
    return tokenizer_lib.load_tokenizer(prefix + ".model")
  text_file = write_text_file(os.path.join(workdir, "tokenizer_corpus.txt"),
                              texts if texts is not None else pydoc_topics())
  return tokenizer_lib.train_tokenizer([text_file], vocab_size, prefix, num_threads=1)


_WORDS = ("a red square on a blue field", "two small circles", "a cat in the sun",
          "the number seven", "stripes going left", "a gray sky over the sea",
          "noise with a bright spot", "three dots in a row")


def caption_for(i):
  return f"{_WORDS[i % len(_WORDS)]} (picture {i})"


def write_text_records(path, texts, *, pretokenize_with=None):
  """Text documents (raw text, or ids when a tokenizer is given). Returns the count."""
  def gen():
    for name, text in texts:
      if pretokenize_with is None:
        yield records_lib.text_record(text, id=name)
      else:
        yield records_lib.text_record(ids=pretokenize_with.encode(text), id=name)
  return records_lib.write_records(path, gen())


def write_image_caption_records(path, count, latent_shape, *, seed=0, start=0):
  """`count` pairs of random float16 latents and captions. Returns the count."""
  rng = np.random.default_rng(seed)

  def gen():
    for i in range(start, start + count):
      latent = rng.standard_normal(latent_shape).astype(np.float16)
      yield records_lib.image_caption_record(latent, caption_for(i), id=f"random-{i}")
  return records_lib.write_records(path, gen(), options="group_size:1,uncompressed")


def write_code_caption_records(path, count, code_shape, codebook_size, *, seed=0, start=0):
  """`count` pairs of random VQ codes [h, w] in [0, codebook_size) and captions (discrete
  images). Returns the count."""
  rng = np.random.default_rng(seed)

  def gen():
    for i in range(start, start + count):
      codes = rng.integers(0, codebook_size, code_shape)
      yield records_lib.image_caption_record(codes=codes, caption=caption_for(i),
                                             id=f"codes-{i}")
  return records_lib.write_records(path, gen())
