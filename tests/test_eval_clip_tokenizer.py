"""The pure-Python CLIP BPE tokenizer against open_clip's, and its errors."""

import gzip
import importlib.util

import numpy as np
import pytest

from tfusion.evaluate import clip_tokenizer

TEXTS = [
    "a photo of a cat", "A Photo Of A CAT.", "Hello, World!!! It's 2024; we're 100% sure.",
    "don't won't shan't y'all I'M you'LL they'd we've", "naïve café — résumé",
    "東京タワーの写真", "한국어 문장입니다", "Привет, мир", "emoji 🐶🐱 test 👍🏽",
    "x²+y³=z¹⁰ Ⅻ ½", "  multiple   spaces\tand\nnewlines  ", "&amp;lt;b&amp;gt;html&lt;/b&gt;",
    "<start_of_text>inside<end_of_text>", "Ünïcödé ÀÉÎÕÜ ß ǅ", "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300, "", " ", "1234567890", "3.14159 is pi; e=2.71828", "snake_case and kebab-case",
    "e-mail: someone@example.com, url https://example.org/a?b=c#d", "C++ & C# & F#",
    "tab\tseparated\tvalues", "quotes “curly” and ‘single’ and \"straight\"",
    "A man riding a horse on a beach at sunset.", "two dogs playing with a frisbee in the park",
    "mixed CASE WoRdS", "ﬁ ligature ﬂ", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "Ελληνικά κείμενα",
    "עברית טקסט", "العربية نص", "हिन्दी पाठ", "...!!!???", "----", "a.b.c.d",
    "mojibake: Ã©tÃ© cafÃ©", "zero\u200bwidth space",
]


@pytest.fixture(scope="module")
def open_clip_vocabulary():
  try:
    return clip_tokenizer.CLIPTokenizer()
  except FileNotFoundError:
    pytest.skip("the BPE vocabulary ships with open_clip_torch, which is not installed")


# A few merges that matter, by rank, then filler: CLIP's file has exactly NUM_MERGES of them.
TINY_MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"),
               ("t", "o</w>"), ("pho", "to</w>")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A CLIPTokenizer over a merges file written here (no open_clip needed). The filler merges
  start with a symbol of a non-ASCII byte, so they never apply to the ASCII texts below."""
  symbols = list(clip_tokenizer.byte_to_char().values())
  high = [clip_tokenizer.byte_to_char()[b] for b in range(128, 256)]
  filler = ((x, y) for x in high for y in symbols + [s + "</w>" for s in symbols])
  merges = TINY_MERGES + [next(filler) for _ in range(clip_tokenizer.NUM_MERGES - len(TINY_MERGES))]
  path = tmp_path_factory.mktemp("clip_bpe") / clip_tokenizer.VOCAB_FILE
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  return clip_tokenizer.CLIPTokenizer(str(path))


@pytest.mark.crosscheck
def test_matches_open_clip(open_clip_vocabulary):
  tokenizer = open_clip_vocabulary
  tok = pytest.importorskip("open_clip.tokenizer")
  ref = tok.SimpleTokenizer()
  mismatches = [t for t in TEXTS if tokenizer.encode(t) != ref.encode(t)]
  assert not mismatches
  np.testing.assert_array_equal(tokenizer(TEXTS), ref(TEXTS).numpy())
  np.testing.assert_array_equal(tokenizer(TEXTS, context_length=9), ref(TEXTS, 9).numpy())
  for ids in (tokenizer.encode(t) for t in TEXTS[:10]):
    assert tokenizer.decode(ids) == ref.decode(ids)


def test_bpe_applies_merges_by_rank(tokenizer):
  """Ids: 256 byte symbols, 256 word-final ones, then one per merge (in rank order)."""
  symbols = list(clip_tokenizer.byte_to_char().values())
  final = lambda ch: 256 + symbols.index(ch)
  merged = lambda rank: 512 + rank
  # photo: p+h (rank 3), ph+o (4), t+o</w> (5), pho+to</w> (6): one symbol.
  assert tokenizer.encode("A Photo of a CAT") == [final("a"), merged(6), merged(2), final("a"),
                                                  merged(1)]
  # No merge for "dog": one symbol per byte, the last word-final.
  assert tokenizer.encode("dog!") == [symbols.index("d"), symbols.index("o"), final("g"),
                                      final("!")]
  # "cab": c+a merges (rank 0), ca+b</w> is no merge.
  assert tokenizer.encode("cab") == [merged(0), final("b")]


def test_rows_start_end_pad_and_truncate(tokenizer):
  rows = tokenizer(["a photo of a cat", "word " * 100])
  assert rows.shape == (2, 77) and rows.dtype == np.int32
  n = len(tokenizer.encode("a photo of a cat"))
  assert n == 5
  assert rows[0, 0] == tokenizer.sot_id == 49406 and rows[0, n + 1] == tokenizer.eot_id == 49407
  np.testing.assert_array_equal(rows[0, 1:n + 1], tokenizer.encode("a photo of a cat"))
  assert not rows[0, n + 2:].any()
  assert rows[1, -1] == tokenizer.eot_id and rows[1].argmax() == 76  # pooled at the end token
  np.testing.assert_array_equal(rows[1, 1:76], tokenizer.encode("word " * 100)[:75])
  assert tokenizer.vocab_size == 49408
  assert tokenizer.decode(tokenizer.encode("A Photo, of a CAT!")) == "a photo , of a cat ! "


def test_missing_vocabulary_is_a_clear_error(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    clip_tokenizer.CLIPTokenizer(str(tmp_path / "nope.txt.gz"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz.*open_clip"):
    clip_tokenizer.CLIPTokenizer()
