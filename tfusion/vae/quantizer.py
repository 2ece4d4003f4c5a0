"""Vector quantization for discrete image tokens (the Chameleon baseline's VQ-VAE).

A codebook [K, D] maps each encoder vector z [..., D] to its nearest entry (squared L2):
  codes = argmin_k ||z - e_k||^2,   z_q = e[codes].
The decoder sees z + stop_gradient(z_q - z): z_q forward, the identity backward (the
straight-through estimator of van den Oord et al. 2017). Losses, averaged over elements:
  commitment = ||z - sg(z_q)||^2 (weighted by beta, 0.25 in the paper),
  codebook   = ||sg(z) - z_q||^2 (only when the codebook is learned by gradient).
With `ema_update` the codebook instead follows exponential moving averages of the vectors
assigned to each code (VQ-VAE-2's appendix; Laplace-smoothed counts), which needs no codebook
loss. Codes whose average count falls below a threshold are "dead": `restart_dead_codes` moves
them onto encoder vectors of the batch. `kmeans_init` seeds a codebook from the first batch.

Everything is a pure function of arrays; the VQ model and trainer hold the state.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Quantized:
  """What `quantize` returns. z_q: [..., D] straight-through; codes: [...] int32."""
  z_q: jax.Array
  codes: jax.Array
  commitment: jax.Array  # scalar, ||z - sg(z_q)||^2 averaged over elements
  codebook_loss: jax.Array  # scalar, ||sg(z) - z_q||^2 averaged over elements


jax.tree_util.register_dataclass(Quantized, data_fields=["z_q", "codes", "commitment",
                                                         "codebook_loss"], meta_fields=[])


def squared_distances(z, codebook):
  """||z_i - e_k||^2 for z [N, D], codebook [K, D] -> [N, K] (float32, expanded form)."""
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  return (jnp.sum(z * z, -1, keepdims=True) - 2.0 * z @ codebook.T
          + jnp.sum(codebook * codebook, -1)[None, :])


def l2_normalize(x, eps=1e-12):
  """x [..., D] / max(||x||, eps) along D (torch.nn.functional.normalize's rule)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), eps)


def nearest_codes(z, codebook, l2_norm=False):
  """Index of the nearest codebook entry per vector: z [..., D] -> [...] int32.

  l2_norm: z and the entries are L2-normalised first (nearest by cosine similarity, as
  LlamaGen's codebook_l2_norm); the caller then decodes with normalised entries too.
  """
  if l2_norm:
    z, codebook = l2_normalize(z), l2_normalize(codebook)
  flat = z.reshape(-1, z.shape[-1])
  return jnp.argmin(squared_distances(flat, codebook), -1).astype(jnp.int32).reshape(z.shape[:-1])


def lookup(codes, codebook):
  """codes [...] -> vectors [..., D]."""
  return jnp.take(codebook, codes, axis=0)


def quantize(z, codebook):
  """Nearest-code quantization with the straight-through estimator (see module doc).

  z: [..., D] encoder output, codebook: [K, D]. Returns Quantized; the caller weighs the losses
  (loss = codebook_loss + beta * commitment, or beta * commitment with ema_update).
  """
  codes = nearest_codes(jax.lax.stop_gradient(z), codebook)
  e = lookup(codes, codebook).astype(z.dtype)
  commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
  codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e))
  z_q = z + jax.lax.stop_gradient(e - z)
  return Quantized(z_q=z_q, codes=codes, commitment=commitment, codebook_loss=codebook_loss)


# --------------------------------------------------------------------- EMA codebook


def init_ema_state(codebook):
  """EMA statistics for `codebook` [K, D]: counts start at 1 per code, sums at the entries."""
  k = codebook.shape[0]
  return {"codebook": codebook.astype(jnp.float32),
          "cluster_size": jnp.ones((k,), jnp.float32),
          "embed_sum": codebook.astype(jnp.float32)}


def ema_update(state, z, codes, decay=0.99, eps=1e-5):
  """One EMA step of the codebook towards the mean of the vectors assigned to each code.

  state: init_ema_state's dict; z: [..., D]; codes: [...] (quantize's). Returns the new state:
    n_k <- decay n_k + (1 - decay) count_k,  s_k <- decay s_k + (1 - decay) sum_{codes = k} z,
    e_k = s_k / n~_k  with Laplace smoothing n~_k = (n_k + eps) / (n + K eps) * n,
  A code that is never chosen has its count and sum decay together; its entry drifts towards
  zero, and restart_dead_codes gives it a place in the data again.
  """
  k, d = state["codebook"].shape
  flat = z.reshape(-1, d).astype(jnp.float32)
  onehot = jax.nn.one_hot(codes.reshape(-1), k, dtype=jnp.float32)  # [N, K]
  counts = onehot.sum(0)
  sums = onehot.T @ flat  # [K, D]
  cluster_size = decay * state["cluster_size"] + (1.0 - decay) * counts
  embed_sum = decay * state["embed_sum"] + (1.0 - decay) * sums
  n = cluster_size.sum()
  smoothed = (cluster_size + eps) / (n + k * eps) * n
  return {"codebook": embed_sum / smoothed[:, None], "cluster_size": cluster_size,
          "embed_sum": embed_sum}


def restart_dead_codes(state, z, rng, threshold=1.0):
  """Moves codes whose EMA count is below `threshold` onto random vectors of the batch z.

  state: init_ema_state's dict; z: [..., D]; rng: a PRNG key. A restarted code gets the chosen
  vector as entry and sum, with count 1 (as a new code). Returns (state, number restarted).
  """
  k, d = state["codebook"].shape
  flat = z.reshape(-1, d).astype(jnp.float32)
  dead = state["cluster_size"] < threshold
  picks = flat[jax.random.randint(rng, (k,), 0, flat.shape[0])]
  codebook = jnp.where(dead[:, None], picks, state["codebook"])
  cluster_size = jnp.where(dead, 1.0, state["cluster_size"])
  embed_sum = jnp.where(dead[:, None], picks, state["embed_sum"])
  return ({"codebook": codebook, "cluster_size": cluster_size, "embed_sum": embed_sum},
          dead.sum())


def kmeanspp_seeds(flat, num_codes, rng):
  """k-means++ seeding: [num_codes, D] vectors of flat [N, D], each drawn with probability
  proportional to its squared distance to the seeds so far (Arthur & Vassilvitskii 2007)."""
  keys = jax.random.split(rng, num_codes)
  first = flat[jax.random.randint(keys[0], (), 0, flat.shape[0])]
  centres = jnp.zeros((num_codes, flat.shape[1]), jnp.float32).at[0].set(first)
  d2 = jnp.sum(jnp.square(flat - first), -1)

  def body(i, carry):
    centres, d2 = carry
    # All vectors already seeds (fewer distinct vectors than codes): draw uniformly.
    logits = jnp.where(d2.sum() > 0, jnp.log(d2), 0.0)
    pick = flat[jax.random.categorical(keys[i], logits)]
    return centres.at[i].set(pick), jnp.minimum(d2, jnp.sum(jnp.square(flat - pick), -1))

  return jax.lax.fori_loop(1, num_codes, body, (centres, d2))[0]


def kmeans_init(z, num_codes, rng, iters=10):
  """A codebook [num_codes, D] from k-means on the vectors z [..., D]: k-means++ seeds, then
  `iters` Lloyd steps; a centre left empty keeps its previous position."""
  flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  centres = kmeanspp_seeds(flat, num_codes, rng)
  for _ in range(iters):
    codes = jnp.argmin(squared_distances(flat, centres), -1)
    onehot = jax.nn.one_hot(codes, num_codes, dtype=jnp.float32)
    counts = onehot.sum(0)
    means = (onehot.T @ flat) / jnp.maximum(counts, 1.0)[:, None]
    centres = jnp.where(counts[:, None] > 0, means, centres)
  return centres


# ------------------------------------------------------------------------ statistics


def usage_stats(codes, num_codes):
  """How the codebook is used by `codes` (any shape, host-side numpy).

  Returns dict(perplexity = exp(entropy of the code histogram), 1 for one code, num_codes for
  uniform use; used = fraction of codes chosen at least once; dead = number never chosen).
  """
  counts = np.bincount(np.asarray(codes).reshape(-1), minlength=num_codes).astype(np.float64)
  p = counts / max(counts.sum(), 1.0)
  nz = p[p > 0]
  return {"perplexity": float(np.exp(-np.sum(nz * np.log(nz)))),
          "used": float(np.mean(counts > 0)), "dead": int(np.sum(counts == 0))}


def check_codes(codes, num_codes, where):
  """Raises ValueError naming `where` when any code is outside [0, num_codes)."""
  codes = np.asarray(codes)
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"{where}: image codes must be integers, got dtype {codes.dtype}")
  bad = (codes < 0) | (codes >= num_codes)
  if bad.any():
    first = np.argwhere(bad)[0].tolist()
    raise ValueError(f"{where}: image code {int(codes[tuple(first)])} at index {first} is "
                     f"outside the codebook [0, {num_codes}) ({int(bad.sum())} such codes)")
