"""The pure-Python CLIP BPE tokenizer against open_clip's, and its errors."""

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
def tokenizer():
  try:
    return clip_tokenizer.CLIPTokenizer()
  except FileNotFoundError:
    pytest.skip("the BPE vocabulary ships with open_clip_torch, which is not installed")


@pytest.mark.crosscheck
def test_matches_open_clip(tokenizer):
  tok = pytest.importorskip("open_clip.tokenizer")
  ref = tok.SimpleTokenizer()
  mismatches = [t for t in TEXTS if tokenizer.encode(t) != ref.encode(t)]
  assert not mismatches
  np.testing.assert_array_equal(tokenizer(TEXTS), ref(TEXTS).numpy())
  np.testing.assert_array_equal(tokenizer(TEXTS, context_length=9), ref(TEXTS, 9).numpy())
  for ids in (tokenizer.encode(t) for t in TEXTS[:10]):
    assert tokenizer.decode(ids) == ref.decode(ids)


def test_rows_start_end_pad_and_truncate(tokenizer):
  rows = tokenizer(["a photo of a cat", "word " * 100])
  assert rows.shape == (2, 77) and rows.dtype == np.int32
  n = len(tokenizer.encode("a photo of a cat"))
  assert rows[0, 0] == tokenizer.sot_id == 49406 and rows[0, n + 1] == tokenizer.eot_id == 49407
  assert not rows[0, n + 2:].any()
  assert rows[1, -1] == tokenizer.eot_id and rows[1].argmax() == 76  # pooled at the end token
  assert tokenizer.vocab_size == 49408
  assert tokenizer.decode(tokenizer.encode("A Photo, of a CAT!")) == "a photo , of a cat ! "


def test_missing_vocabulary_is_a_clear_error(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    clip_tokenizer.CLIPTokenizer(str(tmp_path / "nope.txt.gz"))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz.*open_clip"):
    clip_tokenizer.CLIPTokenizer()
