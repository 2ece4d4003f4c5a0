"""Generated latents kept in chunks on disk, so a killed sampling job resumes where it stopped.

An FID-30k evaluation at 250 steps is hours of sampling; the eval job writes each batch of
generated latents to W/eval_cache/samples/<key>/chunk-<start>.npy as soon as it exists
(atomically: a temporary file renamed, or one object write on a gs:// workdir), and a
restarted job loads the chunks it finds. The key
is a hash of everything that decides the samples: the params (a cheap fingerprint: per-leaf
sums), the captions, the sampler settings, the seed and the batch size (rows batched together
are computed together, so a new batch size is a new set of samples).
"""

import hashlib
import json
import time

import numpy as np

from tfusion import paths


def cache_key(**parts):
  """A short stable hash of JSON-able `parts` (lists of captions, settings dicts, ...)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def params_fingerprint(params):
  """A hash of per-leaf sums and sums of squares (one pass over the params, on device)."""
  import jax
  import jax.numpy as jnp
  stats = jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                            jnp.sum(jnp.square(x.astype(jnp.float32)))]), params)
  return hashlib.sha256(b"".join(np.asarray(v, np.float32).tobytes()
                                 for v in jax.tree.leaves(jax.device_get(stats)))).hexdigest()[:16]


class ChunkCache:
  """Chunks of one sampling job under `directory` (None: nothing kept, e.g. no workdir)."""

  def __init__(self, directory):
    self.directory = directory
    if directory is not None:
      paths.makedirs(directory)

  def _path(self, start):
    return paths.join(self.directory, f"chunk-{start:08d}.npy")

  def get(self, start, count):
    """The chunk of rows [start, start + count) if it was written whole, else None."""
    if self.directory is None or not paths.exists(self._path(start)):
      return None
    try:
      chunk = paths.load_npy(self._path(start))
    except (OSError, ValueError):  # unreadable: generate it again
      return None
    return chunk if len(chunk) == count else None

  def put(self, start, chunk):
    if self.directory is None:
      return
    paths.save_npy(self._path(start), np.asarray(chunk))


class Progress:
  """Images done, images/s and ETA on one log line per chunk (generated chunks only)."""

  def __init__(self, total, log, what="images"):
    self.total, self.log, self.what = total, log, what
    self.done, self.generated, self.start = 0, 0, time.perf_counter()

  def update(self, count, *, cached=False):
    self.done += count
    if cached:
      return
    self.generated += count
    elapsed = time.perf_counter() - self.start
    rate = self.generated / max(elapsed, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    self.log(f"sampling: {self.done}/{self.total} {self.what}, {rate:.2f} {self.what}/s, "
             f"eta {eta / 60:.1f} min")
