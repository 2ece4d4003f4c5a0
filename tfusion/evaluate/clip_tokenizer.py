"""CLIP's byte-level BPE tokenizer (OpenAI CLIP / open_clip "lower" cleaning), pure Python.

It reads the merges file open_clip ships, bpe_simple_vocab_16e6.txt.gz: given by path, or found
inside an installed open_clip_torch (located without importing it, so torch is not loaded).

Text is cleaned as open_clip does (ftfy.fix_text when ftfy is installed, HTML entities
unescaped twice, whitespace collapsed, lowercased), split with CLIP's pattern (contractions,
letter runs, single digits, other non-space runs; the Unicode letter/number classes are built
from `unicodedata`, so the standard `re` module suffices), byte-encoded and BPE-merged.
`tokenizer(texts)` gives [N, context_length] int32 rows: <start_of_text> ids <end_of_text>,
zero-padded, truncated with <end_of_text> kept last.
"""

import functools
import gzip
import html
import importlib.util
import os
import re
import sys
import unicodedata

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
CONTEXT_LENGTH = 77


def find_vocab(path=None):
  """Path of the BPE merges file: `path` if given, else the copy inside an installed open_clip."""
  if path is not None:
    if not os.path.exists(path):
      raise FileNotFoundError(f"CLIP BPE vocabulary {path!r} does not exist")
    return path
  spec = importlib.util.find_spec("open_clip")
  if spec is not None and spec.origin:
    candidate = os.path.join(os.path.dirname(spec.origin), VOCAB_FILE)
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
      f"CLIP BPE vocabulary not found: pass its path ({VOCAB_FILE}, shipped inside the "
      "open_clip_torch package) or install open_clip_torch")


@functools.lru_cache(maxsize=None)
def byte_to_char():
  """Reversible map of the 256 byte values to printable characters (CLIP's/GPT-2's table).

  Its order is the vocabulary's: printable bytes (as themselves) first, then the others,
  moved past 255 so every symbol is visible.
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) +
               list(range(ord("\xae"), ord("\xff") + 1)))
  table = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + i) for i, b in enumerate(others)})
  return table


def _category_class(prefix):
  """A regex character class body matching every code point whose category starts with `prefix`."""
  ranges, start = [], None
  for cp in range(sys.maxunicode + 2):
    inside = cp <= sys.maxunicode and unicodedata.category(chr(cp)).startswith(prefix)
    if inside and start is None:
      start = cp
    elif not inside and start is not None:
      ranges.append((start, cp - 1))
      start = None
  return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                 for a, b in ranges)


@functools.lru_cache(maxsize=None)
def _split_pattern():
  letters, numbers = _category_class("L"), _category_class("N")
  special = "|".join(re.escape(t) for t in SPECIAL_TOKENS)
  return re.compile(
      rf"{special}|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+",
      re.IGNORECASE)


def clean(text):
  """open_clip's "lower" cleaning: fix mojibake, unescape HTML, collapse whitespace, lowercase."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).lower()


class CLIPTokenizer:
  """CLIP BPE tokenizer. `encode(text) -> ids`; `tokenizer(texts) -> int32 [N, L]`."""

  def __init__(self, vocab_path=None, context_length=CONTEXT_LENGTH):
    self.vocab_path = find_vocab(vocab_path)
    with gzip.open(self.vocab_path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{self.vocab_path}: expected {NUM_MERGES} merge lines of two symbols")
    symbols = list(byte_to_char().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += list(SPECIAL_TOKENS)
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = {i: token for token, i in self.encoder.items()}
    self.merge_rank = {pair: i for i, pair in enumerate(merges)}
    self.byte_decoder = {c: b for b, c in byte_to_char().items()}
    self.sot_id, self.eot_id = (self.encoder[t] for t in SPECIAL_TOKENS)
    self.vocab_size = len(vocab)
    self.context_length = context_length
    self._cache = {t: [t] for t in SPECIAL_TOKENS}

  def _bpe(self, word):
    """A byte-encoded word -> its BPE symbols (the last one ends with </w>)."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      best = min(zip(parts, parts[1:]), key=lambda p: self.merge_rank.get(p, NUM_MERGES))
      if best not in self.merge_rank:
        break
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence of the best pair, left to right
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    self._cache[word] = parts
    return parts

  def encode(self, text):
    """Text -> token ids (no start/end tokens)."""
    table = byte_to_char()
    ids = []
    for piece in _split_pattern().findall(clean(text)):
      word = "".join(table[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self._bpe(word))
    return ids

  def decode(self, ids):
    """Token ids -> text (word ends become spaces; special tokens stay as their names)."""
    symbols = "".join(self.decoder[int(i)] for i in ids)
    raw = bytearray(self.byte_decoder[c] for c in symbols)  # "</w>" is printable: kept as is
    return raw.decode("utf-8", errors="replace").replace("</w>", " ")

  def __call__(self, texts, context_length=None):
    """str or list of str -> int32 [N, context_length]."""
    if isinstance(texts, str):
      texts = [texts]
    length = context_length or self.context_length
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > length:
        ids = ids[:length]
        ids[-1] = self.eot_id
      out[row, :len(ids)] = ids
    return out
