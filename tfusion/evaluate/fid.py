"""Frechet Inception Distance: feature statistics, the distance, cached reference statistics.

FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), everything in float64, with the
matrix square root from scipy.linalg.sqrtm (as pytorch-fid: if it is not finite, eps * I is
added to both covariances; an imaginary part above 1e-3 on the diagonal is an error, a smaller
one is rounding and dropped). `method="eigh"` computes the same trace from two symmetric
eigendecompositions instead, several times faster at 2048 dimensions on CPU.

Reference statistics of real images are computed once and cached as
`<cache_dir>/fid_stats_<key>.npz` (mu, sigma, count and what they were computed from: the
content hash of the images, the network hash of the Inception weights, the resolution the
images were brought to before the network). Statistics are only ever compared when network and
resolution agree; a file from another network or resolution is an error naming the file.
"""

import dataclasses
import hashlib
import io
import os
import warnings

import numpy as np
import scipy.linalg

from tfusion import paths

STATS_VERSION = 1


class StatsMismatchError(ValueError):
  """Statistics computed with another network or at another resolution (names the file)."""


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Gaussian fit of Inception features: mu float64 [D], sigma float64 [D, D]."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int
  network: str  # weights hash of the Inception network
  resolution: int  # side of the square images fed to the network (before its 299 resize)
  content: str = ""  # hash of the images (reference statistics)


def feature_statistics(features):
  """float [N, D] -> (mean float64 [D], covariance float64 [D, D], unbiased as np.cov)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f"need features [N >= 2, D], got shape {x.shape}")
  mu = x.mean(axis=0)
  centered = x - mu
  sigma = centered.T @ centered / (len(x) - 1)
  return mu, sigma


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
  """tr((S1 S2)^1/2) as pytorch-fid: scipy's sqrtm of the product."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # handled below
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      # Near-singular product (e.g. fewer samples than dimensions): regularize both sides.
      offset = np.eye(len(sigma1)) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(np.diagonal(covmean).imag))
    if imag > 1e-3:
      raise ValueError(f"sqrtm of the covariance product has an imaginary part of {imag:.3g}")
    covmean = covmean.real
  return np.trace(covmean)


def _trace_sqrt_product_eigh(sigma1, sigma2):
  """tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): S1 S2 is similar to that PSD matrix, so
  two symmetric eigendecompositions give the same number several times faster than sqrtm."""
  w, v = np.linalg.eigh(sigma1)
  root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  inner = np.linalg.eigvalsh(root @ sigma2 @ root)
  return np.sum(np.sqrt(np.clip(inner, 0.0, None)))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64 -> float.

  method: "sqrtm" (scipy.linalg.sqrtm, as pytorch-fid; the default) or "eigh" (the same
  quantity from symmetric eigendecompositions; much faster at 2048 dimensions).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
  elif method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
  else:
    raise ValueError(f"unknown method {method!r} (sqrtm or eigh)")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid(stats_a, stats_b, method="sqrtm"):
  """FID between two Statistics, which must share network and resolution."""
  for field in ("network", "resolution"):
    if getattr(stats_a, field) != getattr(stats_b, field):
      raise StatsMismatchError(f"cannot compare statistics with different {field}: "
                               f"{getattr(stats_a, field)} vs {getattr(stats_b, field)}")
  return frechet_distance(stats_a.mu, stats_a.sigma, stats_b.mu, stats_b.sigma, method=method)


def save_statistics(path, stats):
  """Writes Statistics to an .npz file (atomically: a reader never sees half a file)."""
  buffer = io.BytesIO()
  np.savez(buffer, mu=stats.mu, sigma=stats.sigma, count=stats.count, network=stats.network,
           resolution=stats.resolution, content=stats.content, version=STATS_VERSION)
  paths.write_atomic(path, buffer.getvalue(), tmp_suffix=f".tmp{os.getpid()}")


def load_statistics(path, *, network=None, resolution=None):
  """Reads Statistics from `path`; checks network hash / resolution when given.

  Raises FileNotFoundError, or StatsMismatchError naming the file and what differs.
  """
  if not paths.exists(path):
    raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
  try:
    with np.load(path if paths.is_local(path) else io.BytesIO(paths.read_bytes(path))) as data:
      stats = Statistics(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]),
                         network=str(data["network"]), resolution=int(data["resolution"]),
                         content=str(data["content"]))
  except (KeyError, ValueError, OSError) as e:
    raise StatsMismatchError(f"{path}: not a tfusion FID statistics file ({e})") from None
  if network is not None and stats.network != network:
    raise StatsMismatchError(
        f"{path}: FID statistics computed with another Inception network (weights hash "
        f"{stats.network[:16]}, this network is {network[:16]}); recompute them with these weights")
  if resolution is not None and stats.resolution != resolution:
    raise StatsMismatchError(
        f"{path}: FID statistics computed at resolution {stats.resolution}, images here are "
        f"{resolution}x{resolution}; recompute them at this resolution")
  return stats


def array_content_hash(images):
  """sha256 of an image array's shape, dtype and bytes."""
  a = np.ascontiguousarray(images)
  h = hashlib.sha256(f"array:{a.shape}:{a.dtype}\n".encode())
  h.update(a.tobytes())
  return h.hexdigest()


def folder_content_hash(files):
  """sha256 of the names and bytes of image files (sorted order)."""
  h = hashlib.sha256(b"files\n")
  for path in files:
    h.update(f"{os.path.basename(path)}\n".encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def _check_array(images, resolution):
  a = np.asarray(images)
  if a.ndim != 4 or a.shape[1:] != (resolution, resolution, 3):
    raise ValueError(f"expected real images [N, {resolution}, {resolution}, 3], "
                     f"got shape {a.shape}")
  if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"real images must be uint8 or float in [0, 1], got dtype {a.dtype}")
  return a


def _network_name(extractor, network):
  name = network if network is not None else getattr(extractor, "network", None)
  if not name:
    raise ValueError("name the feature extractor: pass network=... (it is recorded with the "
                     "statistics), or use an extractor with a .network attribute")
  return str(name)


def statistics_of_images(images, extractor, *, resolution, network=None, batch_size=500,
                         content=""):
  """Statistics of images [N, R, R, 3] (uint8 or float in [0, 1]) or an iterable of such batches.

  `extractor`: image batch -> features [n, D]; inception.FIDInception, or any function with
  `network` naming it (e.g. a small digit classifier's features for a CPU demo).
  """
  network = _network_name(extractor, network)
  if isinstance(images, np.ndarray):
    a = _check_array(images, resolution)
    batches = (a[i:i + batch_size] for i in range(0, len(a), batch_size))
  else:
    batches = (_check_array(b, resolution) for b in images)
  features = np.concatenate([np.asarray(extractor(b), np.float32) for b in batches])
  mu, sigma = feature_statistics(features)
  return Statistics(mu, sigma, len(features), network, resolution, content)


def _folder_batches(files, resolution, batch_size):
  from tfusion.vae import images as images_lib
  for start in range(0, len(files), batch_size):
    chunk = [images_lib.load_image(f, resolution) for f in files[start:start + batch_size]]
    yield (np.stack(chunk) + 1.0) * 0.5  # loader gives [-1, 1]; the network takes [0, 1]


def reference_statistics(source, extractor, *, resolution, cache_dir, network=None,
                         batch_size=500):
  """Statistics of real images, computed once and cached by content, network and resolution.

  Args:
    source: a folder of image files (center-cropped and resized to `resolution`, as
      tfusion.vae.images loads them) or an array [N, resolution, resolution, 3].
    extractor: image batch -> features: inception.FIDInception, or any function (then
      `network` must name it).
    resolution: side of the images given to the network (that of the generated images).
    cache_dir: where fid_stats_<key>.npz files live.
    network: name/hash of the extractor; defaults to `extractor.network`.
  Returns:
    (Statistics, path of the cache file).
  """
  network = _network_name(extractor, network)
  if isinstance(source, (str, os.PathLike)):
    from tfusion.vae import images as images_lib
    files = images_lib.list_images(os.fspath(source))
    content = folder_content_hash(files)
    batches = lambda: _folder_batches(files, resolution, batch_size)  # noqa: E731
  else:
    array = _check_array(source, resolution)
    content = array_content_hash(array)
    batches = lambda: array  # noqa: E731
  key = hashlib.sha256(f"v{STATS_VERSION}:{content}:{network}:{resolution}".encode())
  path = paths.join(cache_dir, f"fid_stats_{key.hexdigest()[:24]}.npz")  # may be in gs://
  if paths.exists(path):
    return load_statistics(path, network=network, resolution=resolution), path
  stats = statistics_of_images(batches(), extractor, resolution=resolution, network=network,
                               batch_size=batch_size, content=content)
  paths.makedirs(cache_dir)
  save_statistics(path, stats)
  return stats, path
