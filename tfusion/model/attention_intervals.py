"""The attention rule as per-position intervals, for kernels that skip masked blocks.

The rule (DESIGN.md) is `seg[q] == seg[k] != 0 and k <= horizon[q]`. For a packed row of
contiguous documents it is an interval per query, `doc_start[q] <= k <= horizon[q]`, and seen
from a key, the queries that may read key k lie in `[min(k, image_start(k)), doc_end(k)]`.
`Intervals` carries both views plus (segment_ids, horizons) themselves:

  * kernels apply the rule element-wise from `segment_ids` / `horizons` inside a block, so
    what they compute is the reference rule, bit for bit the same mask;
  * the interval bounds are only used to skip (query block, key block) pairs, so they only
    need to be *conservative*: every allowed pair lies inside them. For a row whose documents
    are not contiguous (an id reappearing after another one or after padding) the document
    bounds of that row fall back to the whole row: exact, just without skipping there.

Padding positions (segment 0) get empty intervals (lo = L, hi = -1) so they never widen a
block's range. Everything here is O(L) per row, jit-able, no scatters.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Intervals(NamedTuple):
  """Interval description of the attention mask of B packed rows (a pytree).

  All fields int32 [B, L]. Query q may see key k iff
  `segment_ids[q] == segment_ids[k] != 0 and k <= horizons[q]`; moreover (bounds)
  `kv_lo[q] <= k <= kv_hi[q]` and `q_lo[k] <= q <= q_hi[k]` for every allowed pair.
  """
  segment_ids: jax.Array  # 1.. document, 0 = padding
  horizons: jax.Array  # last key each query may see (before the segment check)
  kv_lo: jax.Array  # first key query q may see (its document start); L for padding
  kv_hi: jax.Array  # last key query q may see (= horizon); -1 for padding
  q_lo: jax.Array  # first query that may see key k (k, or its image start); L for padding
  q_hi: jax.Array  # last query that may see key k (its document end); -1 for padding

  @property
  def length(self):
    return self.segment_ids.shape[1]


def contiguous_rows(segment_ids):
  """bool [B]: True where every non-zero segment id occupies one contiguous run.

  Checked as: each run of a non-zero id starts with an id larger than every id before it
  (the batch contract numbers documents 1, 2, ... along the row). Sufficient, cheap, O(L).
  """
  prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
  prev_max = jnp.pad(jax.lax.cummax(segment_ids, axis=1)[:, :-1], ((0, 0), (1, 0)))
  bad = (segment_ids != 0) & (segment_ids != prev) & (segment_ids <= prev_max)
  return ~jnp.any(bad, axis=1)


def run_bounds(segment_ids):
  """First and last position of the run of equal segment ids each position is in. -> 2x [B, L]."""
  _, length = segment_ids.shape
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  nxt = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
  start = jax.lax.cummax(jnp.where(segment_ids != prev, pos, 0), axis=1)
  end = jax.lax.cummin(jnp.where(segment_ids != nxt, pos, length), axis=1, reverse=True)
  return start, end


def build(segment_ids, horizons, first_viewer):
  """Intervals from the rule's vectors.

  Args:
    segment_ids: int [B, L], 0 = padding.
    horizons: int [B, L], the rule's horizon per query.
    first_viewer: int [B, L], for each key the smallest query position whose horizon can
      reach it (k itself, or the first patch of k's image when images are bidirectional).
  Returns:
    Intervals.
  """
  segment_ids = segment_ids.astype(jnp.int32)
  horizons = horizons.astype(jnp.int32)
  length = segment_ids.shape[1]
  pad = segment_ids == 0
  start, end = run_bounds(segment_ids)
  ok = contiguous_rows(segment_ids)[:, None]
  # Non-contiguous row: the document bounds are no longer known cheaply; use the whole row.
  start = jnp.where(ok, start, 0)
  end = jnp.where(ok, end, length - 1)
  return Intervals(
      segment_ids=segment_ids, horizons=horizons,
      kv_lo=jnp.where(pad, length, start), kv_hi=jnp.where(pad, -1, horizons),
      q_lo=jnp.where(pad, length, first_viewer.astype(jnp.int32)),
      q_hi=jnp.where(pad, -1, end))


def pad_to(iv, length):
  """Extends the rows to `length` positions with padding (segment 0, empty intervals)."""
  extra = length - iv.length
  if extra == 0:
    return iv
  p = lambda x, value: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)
  return Intervals(p(iv.segment_ids, 0), p(iv.horizons, -1), p(iv.kv_lo, length),
                   p(iv.kv_hi, -1), p(iv.q_lo, length), p(iv.q_hi, -1))


def block_ranges(lo, hi, block, other_block):
  """Per block of `block` positions, the inclusive range of `other_block`-sized blocks it meets.

  Args:
    lo, hi: int [B, Lp] per-position bounds (Lp a multiple of `block`; lo > hi = empty).
  Returns:
    (first, last) int32 [B, Lp // block]; first > last where the whole block is empty.
  """
  b, length = lo.shape
  lo = lo.reshape(b, length // block, block).min(-1)
  hi = hi.reshape(b, length // block, block).max(-1)
  first = lo // other_block
  # An empty block gets last = -1 (and first >= the block count): a union over rows
  # (min first, max last; the chunked kernel's shared loop bounds) then ignores it.
  last = jnp.where(hi >= lo, hi // other_block, -1)
  return first.astype(jnp.int32), last.astype(jnp.int32)


def allowed_pairs(iv):
  """Number of allowed (query, key) pairs per row, int32 [B].

  Exact for rows whose documents are contiguous (the batch contract); for other rows it is an
  upper bound.
  """
  return jnp.maximum(iv.kv_hi - iv.kv_lo + 1, 0).sum(axis=1)
