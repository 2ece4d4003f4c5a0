"""Log-likelihood scoring of text with a Transfusion model: the engine behind perplexity and
multiple-choice accuracy.

A scoring request is a token sequence plus the index from which its tokens are scored (the
context before it only conditions). Requests are packed whole into rows of length L with their
own segment ids, so requests never see each other (the same mask as training), and scored in
fixed-shape batches (one compilation).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tfusion.model import transfusion


@dataclasses.dataclass(frozen=True)
class Request:
  """Score tokens ids[score_from:] given ids[:score_from]. ids: int sequence, score_from >= 1."""
  ids: np.ndarray
  score_from: int


def pack_requests(requests, length):
  """First-fit packing of requests (each at most `length` tokens) into rows.

  Returns:
    dict of int/bool arrays [R, L]: tokens, positions, segment_ids, targets, score_mask
    (position predicts a scored token) and request_id (-1 where nothing is scored).
  """
  rows, fill = [], []
  for r, req in enumerate(requests):
    n = len(req.ids)
    if n > length:
      raise ValueError(f"request {r} has {n} tokens; rows hold {length}")
    if not 1 <= req.score_from < n + 1:
      raise ValueError(f"request {r}: score_from={req.score_from} outside [1, {n}]")
    for i, used in enumerate(fill):
      if used + n <= length:
        break
    else:
      rows.append([])
      fill.append(0)
      i = len(rows) - 1
    rows[i].append(r)
    fill[i] += n
  out = {k: np.zeros((len(rows), length), np.int32)
         for k in ("tokens", "positions", "segment_ids", "targets")}
  out["score_mask"] = np.zeros((len(rows), length), bool)
  out["request_id"] = np.full((len(rows), length), -1, np.int32)
  for row, members in enumerate(rows):
    cursor = 0
    for seg, r in enumerate(members, start=1):
      ids = np.asarray(requests[r].ids, np.int32)
      n = len(ids)
      span = slice(cursor, cursor + n)
      out["tokens"][row, span] = ids
      out["positions"][row, span] = np.arange(n)
      out["segment_ids"][row, span] = seg
      # Position j predicts token j + 1; scored when j + 1 >= score_from.
      out["targets"][row, cursor:cursor + n - 1] = ids[1:]
      scored = np.arange(n - 1) + 1 >= requests[r].score_from
      out["score_mask"][row, cursor:cursor + n - 1] = scored
      out["request_id"][row, cursor:cursor + n - 1] = np.where(scored, r, -1)
      cursor += n
  return out


def make_scorer(model, params, *, batch_size, length):
  """Returns score(requests) -> (logprob sums [R], token counts [R], all-greedy flags [R])."""

  @jax.jit
  def token_logprobs(tokens, positions, segment_ids, targets):
    logits = model.apply(params, tokens, positions, segment_ids,
                         method=transfusion.Transfusion.text_forward)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets

  def score(requests):
    packed = pack_requests(requests, length)
    num_rows = packed["tokens"].shape[0]
    pad = (-num_rows) % batch_size
    arrays = {k: np.pad(v, ((0, pad), (0, 0)), constant_values=-1 if k == "request_id" else 0)
              for k, v in packed.items()}
    sums = np.zeros(len(requests), np.float64)
    counts = np.zeros(len(requests), np.int64)
    greedy = np.ones(len(requests), bool)
    for start in range(0, num_rows + pad, batch_size):
      part = {k: v[start:start + batch_size] for k, v in arrays.items()}
      logp, match = token_logprobs(part["tokens"], part["positions"], part["segment_ids"],
                                   part["targets"])
      rid = part["request_id"].ravel()
      keep = rid >= 0
      np.add.at(sums, rid[keep], np.asarray(logp, np.float64).ravel()[keep])
      np.add.at(counts, rid[keep], 1)
      np.logical_and.at(greedy, rid[keep], np.asarray(match).ravel()[keep])
    return sums, counts, greedy

  return score
