"""Multiple-choice accuracy by ranked classification (the Llama 2 suite, as lm-evaluation-harness).

Task files are JSONL, one question per line:

    {"context": "Question: ...\\nAnswer:", "choices": [" yes", " no"], "gold": 0}

The model scores log p(choice | context) for every choice; `acc` picks the highest, `acc_norm`
the highest per character of the choice (harness' length normalization). A question may instead
give one context per choice and a shared continuation (WinoGrande's partial scoring):

    {"contexts": ["... Sarah", "... Maria"], "continuation": " was upset.", "gold": 1}

`tfusion/evaluate/mc_convert.py` turns the public HellaSwag, PIQA, SIQA, ARC, BoolQ and WinoGrande
files into this format.
"""

import json

import numpy as np

from tfusion.evaluate import text_scoring


class TaskFileError(ValueError):
  """A malformed multiple-choice task file (names the file and line)."""


def load_task(path):
  """Reads a task file. Returns a list of dicts with keys pairs [(context, continuation)], gold."""
  items = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskFileError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(item, dict):
        raise TaskFileError(f"{where}: expected a JSON object")
      if "choices" in item:
        if not isinstance(item.get("context"), str):
          raise TaskFileError(f"{where}: 'context' must be a string")
        choices = item["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(
            isinstance(c, str) and c for c in choices):
          raise TaskFileError(f"{where}: 'choices' must be a list of >= 2 non-empty strings")
        pairs = [(item["context"], c) for c in choices]
      elif "contexts" in item:
        contexts, cont = item["contexts"], item.get("continuation")
        if not isinstance(contexts, list) or len(contexts) < 2 or not all(
            isinstance(c, str) for c in contexts) or not isinstance(cont, str) or not cont:
          raise TaskFileError(f"{where}: 'contexts' must be >= 2 strings and 'continuation' a "
                              "non-empty string")
        pairs = [(c, cont) for c in contexts]
      else:
        raise TaskFileError(f"{where}: needs 'context' + 'choices' or 'contexts' + 'continuation'")
      gold = item.get("gold")
      if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(pairs):
        raise TaskFileError(f"{where}: 'gold' must be an integer index into the "
                            f"{len(pairs)} choices, got {gold!r}")
      items.append({"pairs": pairs, "gold": gold})
  if not items:
    raise TaskFileError(f"{path}: no questions")
  return items


def encode_pair(tokenizer, context, continuation, max_len):
  """Token ids of BOS + context + continuation and the index where the continuation starts.

  As the harness does: trailing spaces of the context move to the continuation, the pair is
  tokenized jointly and split where the context's own tokens end; contexts that do not fit are
  cut from the left.
  """
  stripped = context.rstrip(" ")
  continuation = context[len(stripped):] + continuation
  ctx = [tokenizer.bos_id] + list(tokenizer.encode(stripped))
  whole = [tokenizer.bos_id] + list(tokenizer.encode(stripped + continuation))
  if whole[:len(ctx)] != ctx:  # tokenization merged across the boundary: encode separately
    whole = ctx + list(tokenizer.encode(continuation))
  cont = whole[len(ctx):]
  if not cont:
    raise ValueError(f"continuation {continuation!r} encodes to no tokens")
  ids = whole[-max_len:]
  return np.asarray(ids, np.int32), max(len(ids) - len(cont), 1)


def evaluate_task(scorer, tokenizer, items, *, max_len):
  """Ranked classification over `items` (from load_task). -> {"acc", "acc_norm", "n"}."""
  requests, owners = [], []
  for q, item in enumerate(items):
    for context, continuation in item["pairs"]:
      ids, start = encode_pair(tokenizer, context, continuation, max_len)
      requests.append(text_scoring.Request(ids, start))
      owners.append(q)
  loglik, _, _ = scorer(requests)
  acc = acc_norm = 0
  cursor = 0
  for item in items:
    k = len(item["pairs"])
    ll = loglik[cursor:cursor + k]
    lengths = np.array([len(cont) for _, cont in item["pairs"]], np.float64)
    acc += int(np.argmax(ll) == item["gold"])
    acc_norm += int(np.argmax(ll / lengths) == item["gold"])
    cursor += k
  n = len(items)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
