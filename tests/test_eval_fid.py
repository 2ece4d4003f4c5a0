"""FID math (self-distance, closed forms, singular covariances, pytorch-fid agreement) and the
reference-statistics cache (computed once, keyed by content/network/resolution, mismatches
name the file)."""

import numpy as np
import pytest
from PIL import Image

from tfusion.evaluate import fid


def _psd_sqrt(a):
  w, v = np.linalg.eigh(a)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form(mu1, s1, mu2, s2):
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigendecompositions."""
  r = _psd_sqrt(s1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(_psd_sqrt(r @ s2 @ r)))


def _random_cov(rng, d):
  a = rng.standard_normal((d, 2 * d))
  return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def test_statistics_are_float64_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
  mu, sigma = fid.feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


def test_fid_of_a_set_against_itself_is_zero():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((500, 64)) @ _random_cov(rng, 64)
  mu, sigma = fid.feature_statistics(feats)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_shifted_features_give_the_squared_shift():
  # Y = X + m has the same sample covariance, so FID is exactly |m|^2.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2000, 32)) @ _random_cov(rng, 32)
  shift = rng.standard_normal(32)
  a, b = fid.feature_statistics(x), fid.feature_statistics(x + shift)
  assert fid.frechet_distance(*a, *b) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_matches_closed_form_for_gaussians():
  rng = np.random.default_rng(0)
  d = 24
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 1.0
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)  # non-commuting
  expected = _closed_form(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  assert fid.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9)
  # Diagonal case, by hand: |m|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
  value = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert value == pytest.approx(expected, rel=1e-10)


def test_sampled_shifted_gaussian_approaches_closed_form():
  rng = np.random.default_rng(0)
  d, n = 8, 20000
  shift = np.full(d, 0.5)
  a = fid.feature_statistics(rng.standard_normal((n, d)))
  b = fid.feature_statistics(rng.standard_normal((n, d)) + shift)
  # Closed form for N(0, I) vs N(m, I) is |m|^2 = 2; sampling error ~ d / n per term.
  assert fid.frechet_distance(*a, *b) == pytest.approx(2.0, abs=0.02)


def test_fewer_samples_than_dimensions_stay_finite():
  rng = np.random.default_rng(0)
  a = fid.feature_statistics(rng.standard_normal((10, 40)))
  b = fid.feature_statistics(rng.standard_normal((12, 40)))
  value = fid.frechet_distance(*a, *b)
  assert np.isfinite(value) and value > 0
  assert fid.frechet_distance(*a, *b, method="eigh") == pytest.approx(value, rel=1e-4)
  assert abs(fid.frechet_distance(*a, *a)) < 1e-3


@pytest.mark.crosscheck
def test_agrees_with_pytorch_fid():
  fid_score = pytest.importorskip("pytorch_fid.fid_score")
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(48), rng.standard_normal(48)
  s1, s2 = _random_cov(rng, 48), _random_cov(rng, 48)
  ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-10)


def test_mismatched_shapes_are_rejected():
  with pytest.raises(ValueError, match="mismatched"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="unknown method 'svd'"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


class FakeExtractor:
  """Deterministic 5-d 'features' of images in [0, 1]; counts calls."""

  def __init__(self, network="fake-net-a"):
    self.network = network
    self.calls = 0

  def __call__(self, images):
    self.calls += 1
    x = np.asarray(images, np.float32)
    x = x / 255.0 if np.asarray(images).dtype == np.uint8 else x
    return np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0], x[:, -1, -1, 2],
                     x[..., 1].max((1, 2))], axis=1)


def test_reference_statistics_are_computed_once_and_cached(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
  ext = FakeExtractor()
  stats, path = fid.reference_statistics(images, ext, resolution=8, cache_dir=str(tmp_path),
                                         batch_size=6)
  assert ext.calls == 4 and stats.count == 20 and stats.network == "fake-net-a"
  mu, sigma = fid.feature_statistics(ext(images))
  np.testing.assert_allclose(stats.mu, mu, rtol=1e-6)
  np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-5, atol=1e-9)
  calls = ext.calls
  again, again_path = fid.reference_statistics(images, ext, resolution=8, cache_dir=str(tmp_path))
  assert ext.calls == calls and again_path == path
  np.testing.assert_array_equal(again.sigma, stats.sigma)
  # Other images, or another network, get their own file.
  other = images.copy()
  other[0, 0, 0, 0] ^= 1
  assert fid.reference_statistics(other, ext, resolution=8, cache_dir=str(tmp_path))[1] != path
  assert fid.reference_statistics(images, FakeExtractor("fake-net-b"), resolution=8,
                                  cache_dir=str(tmp_path))[1] != path


def test_statistics_from_another_network_or_resolution_name_the_file(tmp_path):
  images = np.random.default_rng(0).random((10, 8, 8, 3)).astype(np.float32)
  stats, path = fid.reference_statistics(images, FakeExtractor(), resolution=8,
                                         cache_dir=str(tmp_path))
  assert fid.load_statistics(path, network="fake-net-a", resolution=8).count == 10
  with pytest.raises(fid.StatsMismatchError, match=f"{path}.*another Inception network"):
    fid.load_statistics(path, network="fake-net-b", resolution=8)
  with pytest.raises(fid.StatsMismatchError, match=f"{path}.*resolution 8.*16x16"):
    fid.load_statistics(path, network="fake-net-a", resolution=16)
  other = fid.Statistics(stats.mu, stats.sigma, 10, "fake-net-a", 16)
  with pytest.raises(fid.StatsMismatchError, match="resolution"):
    fid.fid(stats, other)
  assert fid.fid(stats, stats) == pytest.approx(0.0, abs=1e-9)
  (tmp_path / "junk.npz").write_bytes(b"junk")
  with pytest.raises(fid.StatsMismatchError, match="junk.npz"):
    fid.load_statistics(str(tmp_path / "junk.npz"))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    fid.load_statistics(str(tmp_path / "missing.npz"))


def test_a_plain_function_extractor_needs_a_network_name(tmp_path):
  images = np.random.default_rng(0).random((6, 8, 8, 3)).astype(np.float32)
  features = lambda x: np.asarray(x).reshape(len(x), -1)[:, :4]  # noqa: E731
  with pytest.raises(ValueError, match="network="):
    fid.reference_statistics(images, features, resolution=8, cache_dir=str(tmp_path))
  stats, path = fid.reference_statistics(images, features, resolution=8, cache_dir=str(tmp_path),
                                         network="first-pixels")
  assert stats.network == "first-pixels" and stats.count == 6
  np.testing.assert_allclose(stats.mu, images.reshape(6, -1)[:, :4].mean(0), rtol=1e-6)
  with pytest.raises(fid.StatsMismatchError, match=path):
    fid.load_statistics(path, network="fake-net-a")
  direct = fid.statistics_of_images(images, features, resolution=8, network="first-pixels")
  np.testing.assert_allclose(direct.sigma, stats.sigma)


def test_real_images_must_have_the_resolution(tmp_path):
  with pytest.raises(ValueError, match=r"\[N, 8, 8, 3\].*\(4, 9, 8, 3\)"):
    fid.reference_statistics(np.zeros((4, 9, 8, 3), np.uint8), FakeExtractor(), resolution=8,
                             cache_dir=str(tmp_path))


def test_folder_reference_statistics(tmp_path):
  folder = tmp_path / "real"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  ext = FakeExtractor()
  stats, path = fid.reference_statistics(str(folder), ext, resolution=8,
                                         cache_dir=str(tmp_path / "cache"), batch_size=2)
  assert stats.count == 5 and ext.calls == 3
  assert fid.reference_statistics(str(folder), ext, resolution=8,
                                  cache_dir=str(tmp_path / "cache"))[1] == path
  assert ext.calls == 3
  Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / "0.png")
  assert fid.reference_statistics(str(folder), ext, resolution=8,
                                  cache_dir=str(tmp_path / "cache"))[1] != path
