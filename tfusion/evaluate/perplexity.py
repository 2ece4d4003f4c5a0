"""Token-weighted perplexity on held-out text files.

Each file is read as documents (separated by blank lines, or one document per line for
.jsonl files with a "text" field), tokenized with BOS/EOS, split into windows of at most L
tokens that overlap by one token (so every token after the first of a document is predicted
exactly once, with the context reset at window boundaries), and packed with segment ids so no
window sees another. perplexity = exp(total NLL / scored tokens).
"""

import json
import math
import os

import numpy as np

from tfusion.evaluate import text_scoring


def read_documents(path):
  """Documents of a .txt (blank-line separated) or .jsonl ({"text": ...}) file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"perplexity text file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      docs = []
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from None
    else:
      docs = [d.strip() for d in f.read().split("\n\n")]
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise ValueError(f"perplexity text file {path!r} holds no text")
  return docs


def windows(ids, length):
  """Splits one document's ids into scoring requests of <= length tokens overlapping by one."""
  out, start = [], 0
  while True:
    piece = ids[start:start + length]
    out.append(text_scoring.Request(np.asarray(piece, np.int32), 1))
    if start + length >= len(ids):
      return out
    start += length - 1


def perplexity(scorer, tokenizer, documents, *, length, max_tokens=None):
  """-> {"ppl", "nll", "tokens"} over `documents` (strings), up to `max_tokens` scored tokens."""
  requests, total = [], 0
  for doc in documents:
    ids = [tokenizer.bos_id] + list(tokenizer.encode(doc)) + [tokenizer.eos_id]
    if max_tokens is not None and total + len(ids) - 1 > max_tokens:
      ids = ids[:max_tokens - total + 1]
    if len(ids) < 2:
      break
    requests.extend(windows(ids, length))
    total += len(ids) - 1
  sums, counts, _ = scorer(requests)
  n = int(counts.sum())
  nll = -float(sums.sum()) / max(n, 1)
  return {"ppl": math.exp(nll), "nll": nll, "tokens": n}
