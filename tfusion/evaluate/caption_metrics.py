"""Captioning metrics: CIDEr-D and corpus BLEU-4, pure Python.

Tokenization (in place of coco-caption's Stanford PTB tokenizer, which needs Java): lowercase;
apostrophes are deleted ("dog's" -> "dogs", "don't" -> "dont"); every other character of
`string.punctuation` becomes a space ("black-and-white." -> "black and white"); split on
whitespace. Scores therefore differ slightly from coco-caption's on text with punctuation.

CIDEr-D follows coco-caption's CiderScorer (Vedantam et al. 2015, the "-D" variant):
n-grams n = 1..4; tf-idf vectors with document frequencies counted over the reference sets of
the evaluated corpus (an n-gram counts once per image) and idf = log(#images) - log(max(1, df));
per n, sum over references of the clipped cosine
  sum_g min(c_g, r_g) r_g / (|c| |r|)
times the Gaussian length penalty exp(-(l_c - l_r)^2 / (2 * 6^2)), where, as in coco-caption's
code, the "length" is the number of bigrams; averaged over n, divided by the number of
references, times 10, and averaged over images.

BLEU-4 is corpus level (Papineni et al. 2002): clipped n-gram precisions summed over the
corpus, geometric mean over n = 1..4, brevity penalty exp(1 - r/c) with r the sum of each
candidate's closest reference length (ties to the shorter). No smoothing: a corpus without a
single matching 4-gram scores 0.
"""

import collections
import math
import string

_APOSTROPHES = "'\u2019"
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation if c not in _APOSTROPHES})


def tokenize(text):
  """Caption -> list of lowercase word tokens (see the module docstring)."""
  text = text.lower()
  for a in _APOSTROPHES:
    text = text.replace(a, "")
  return text.translate(_PUNCTUATION).split()


def ngram_counts(tokens, n):
  """Counter of the k-grams (tuples) of `tokens` for k = 1..n."""
  counts = collections.Counter()
  for k in range(1, n + 1):
    for i in range(len(tokens) - k + 1):
      counts[tuple(tokens[i:i + k])] += 1
  return counts


def _check(candidates, references):
  if len(candidates) != len(references):
    raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"reference set {i} must be a non-empty list of strings")


def cider_d(candidates, references, *, n=4, sigma=6.0):
  """CIDEr-D (coco-caption).

  Args:
    candidates: list of N caption strings.
    references: list of N lists of reference strings.
  Returns:
    (corpus score, list of N per-image scores).
  """
  _check(candidates, references)
  cands = [ngram_counts(tokenize(c), n) for c in candidates]
  refs = [[ngram_counts(tokenize(r), n) for r in rs] for rs in references]
  doc_freq = collections.Counter()
  for rs in refs:
    doc_freq.update(set().union(*rs))
  log_images = math.log(len(refs)) if refs else 0.0

  def tfidf(counts):
    vec = [dict() for _ in range(n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(v * v for v in vec_k.values())) for vec_k in vec]
    bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, bigrams

  scores = []
  for cand, rs in zip(cands, refs):
    c_vec, c_norm, c_len = tfidf(cand)
    total = 0.0
    for r in rs:
      r_vec, r_norm, r_len = tfidf(r)
      penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        dot = sum(min(v, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, v in c_vec[k].items())
        if c_norm[k] and r_norm[k]:
          dot /= c_norm[k] * r_norm[k]
        total += dot * penalty / n
    scores.append(10.0 * total / len(rs))
  return (sum(scores) / len(scores) if scores else 0.0), scores


def bleu(candidates, references, *, n=4):
  """Corpus BLEU-n (default BLEU-4) in [0, 1]; arguments as cider_d."""
  _check(candidates, references)
  matches, totals = [0] * n, [0] * n
  cand_len = ref_len = 0
  for cand, rs in zip(candidates, references):
    c_tokens = tokenize(cand)
    r_tokens = [tokenize(r) for r in rs]
    c_counts = ngram_counts(c_tokens, n)
    max_ref = collections.Counter()
    for r in r_tokens:
      max_ref |= ngram_counts(r, n)  # elementwise max: the clipping counts
    for gram, count in c_counts.items():
      matches[len(gram) - 1] += min(count, max_ref[gram])
    for k in range(n):
      totals[k] += max(0, len(c_tokens) - k)
    cand_len += len(c_tokens)
    ref_len += min((abs(len(r) - len(c_tokens)), len(r)) for r in r_tokens)[1]
  if min(matches) == 0:
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / n
  brevity = 1.0 if cand_len >= ref_len else math.exp(1.0 - ref_len / cand_len)
  return brevity * math.exp(log_precision)
