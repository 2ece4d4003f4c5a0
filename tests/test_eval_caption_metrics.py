"""CIDEr-D and BLEU-4: hand-checked values and a dense brute-force CIDEr-D re-implementation."""

import math

import numpy as np
import pytest

from tfusion.evaluate import caption_metrics as cm


def test_tokenization_lowercases_and_strips_punctuation():
  assert cm.tokenize("A Dog's toy, black-and-white.  DON'T!") == [
      "a", "dogs", "toy", "black", "and", "white", "dont"]
  assert cm.tokenize("“Quoted” — text…") == ["“quoted”", "—", "text…"]  # only ASCII punctuation


def _grams(tokens, k):
  return [tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)]


def brute_force_cider_d(candidates, references, sigma=6.0):
  """Dense tf-idf vectors over every n-gram of the corpus, written out directly."""
  cands = [cm.tokenize(c) for c in candidates]
  refs = [[cm.tokenize(r) for r in rs] for rs in references]
  n_images = len(refs)
  scores = []
  for c, rs in zip(cands, refs):
    total = 0.0
    for r in rs:
      penalty = math.exp(-((max(len(c) - 1, 0) - max(len(r) - 1, 0)) ** 2) / (2 * sigma ** 2))
      for k in range(1, 5):
        vocab = sorted({g for rr in refs for x in rr for g in _grams(x, k)} | set(_grams(c, k)))
        index = {g: i for i, g in enumerate(vocab)}
        df = np.array([sum(any(g in _grams(x, k) for x in rr) for rr in refs) for g in vocab])
        idf = math.log(n_images) - np.log(np.maximum(df, 1.0))
        vc, vr = np.zeros(len(vocab)), np.zeros(len(vocab))
        for g in _grams(c, k):
          vc[index[g]] += 1
        for g in _grams(r, k):
          vr[index[g]] += 1
        vc, vr = vc * idf, vr * idf
        value = np.sum(np.minimum(vc, vr) * vr)
        if np.linalg.norm(vc) and np.linalg.norm(vr):
          value /= np.linalg.norm(vc) * np.linalg.norm(vr)
        total += value * penalty / 4
    scores.append(10 * total / len(rs))
  return float(np.mean(scores)), scores


def _random_corpus(rng, n_images, words=12):
  vocab = [f"w{i}" for i in range(words)]
  def sentence():
    return " ".join(rng.choice(vocab, rng.integers(1, 12)))
  references = [[sentence() for _ in range(rng.integers(1, 5))] for _ in range(n_images)]
  candidates = []
  for rs in references:  # some copies, some edits, some unrelated
    choice = rng.integers(3)
    candidates.append(rs[0] if choice == 0 else
                      rs[0] + " " + sentence() if choice == 1 else sentence())
  return candidates, references


@pytest.mark.parametrize("seed", range(4))
def test_cider_d_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  candidates, references = _random_corpus(rng, n_images=6)
  score, per_image = cm.cider_d(candidates, references)
  ref_score, ref_per_image = brute_force_cider_d(candidates, references)
  np.testing.assert_allclose(per_image, ref_per_image, rtol=1e-12, atol=1e-12)
  assert score == pytest.approx(ref_score, rel=1e-12)
  assert max(per_image) > 0


def test_cider_d_hand_checked_values():
  # Identical captions with no n-gram shared between images: every cosine is 1 -> 10.
  bus, cats = "a red bus stops here", "two green cats sleep"
  _, per = cm.cider_d([bus, cats], [[bus], [cats]])
  assert per == pytest.approx([10.0, 10.0])
  # Three words have no 4-grams: 10 * (1 + 1 + 1 + 0) / 4.
  _, per = cm.cider_d(["a red bus", "two green cats"], [["a red bus"], ["two green cats"]])
  assert per == pytest.approx([7.5, 7.5])
  # "a" is in every image (idf 0); unigram and bigram cosines are 1, there are no 3/4-grams:
  # 10 * (1 + 1 + 0 + 0) / 4 = 5.
  _, per = cm.cider_d(["a dog", "a cat"], [["a dog"], ["a cat"]])
  assert per == pytest.approx([5.0, 5.0])
  # One image: idf = log(1) - log(1) = 0 everywhere, so CIDEr-D is 0 (as coco-caption).
  assert cm.cider_d(["a dog"], [["a dog"]])[0] == 0.0
  # Two references, one matching: the average over references halves the score.
  _, per = cm.cider_d([bus, cats], [[bus, "one blue car waits"], [cats]])
  assert per[0] == pytest.approx(5.0)
  # Length penalty: candidate 2 bigrams longer than its reference scales by exp(-4 / 72).
  c = "p q r s t u"
  r = "p q r s"
  _, per = cm.cider_d([c, "x y"], [[r], ["x y"]])
  _, ref = brute_force_cider_d([c, "x y"], [[r], ["x y"]])
  assert per[0] == pytest.approx(ref[0])
  assert 0 < per[0] < 10 * math.exp(-4 / 72)


def test_bleu_hand_checked_values():
  assert cm.bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
  # Papineni et al.: modified unigram precision of "the the the ..." is 2/7 (c=7 > r=6: no BP).
  assert cm.bleu(["the the the the the the the"], [["the cat is on the mat"]], n=1) == \
      pytest.approx(2 / 7)
  # p1..p4 = 4/5, 3/4, 2/3, 1/2; c = 5 < r = 6: BP = exp(1 - 6/5).
  expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 6 / 5)
  assert cm.bleu(["a b c d e"], [["a b c d f g"]]) == pytest.approx(expected)
  # Closest reference length, ties to the shorter one: r = 4 (not 6), so no brevity penalty.
  assert cm.bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(1.0)
  # Corpus level: counts add up over sentences before the ratios.
  corpus = cm.bleu(["a b c d e", "a b c d"], [["a b c d f g"], ["a b c d"]])
  expected = (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25 * math.exp(1 - 10 / 9)
  assert corpus == pytest.approx(expected)
  assert cm.bleu(["a b c"], [["x y z w"]]) == 0.0


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="2 candidates but 1 reference"):
    cm.cider_d(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="reference set 1"):
    cm.bleu(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="reference set 0"):
    cm.bleu(["a"], ["a plain string"])
