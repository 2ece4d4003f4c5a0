"""InceptionV3 as used for FID (pytorch-fid's network), in Flax Linen, NHWC.

The architecture is torchvision's InceptionV3 with the FID patches of the TensorFlow graph
(inception-2015-12-05): average pools in the A/C/E1 blocks ignore padded zeros, the last E
block max-pools. Input images in [0, 1] are resized to 299x299 exactly as pytorch-fid does
(bilinear, align_corners=False, no antialiasing), scaled to [-1, 1], and the output is the
2048-d average pool ("pool3") of the last block.

Weights file (`.npz`, written by `tfusion-convert-inception` from pytorch-fid's
pt_inception-2015-12-05-6726825d.pth): one array per variable, keyed
"<collection>/<module path>/<name>" with collections "params" (conv "kernel" [kh, kw, in, out],
batch-norm "scale" and "bias") and "batch_stats" (batch-norm "mean" and "var"), module paths
named after torchvision's (e.g. "params/Mixed_5b/branch5x5_2/conv/kernel"). The network is
identified by a hash of the array contents (`weights_hash`), recorded with FID statistics.
"""

import functools
import hashlib
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_RESOLUTION = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3


class WeightsError(ValueError):
  """An Inception weights file that does not match the network (lists every problem)."""


class ConvBN(nn.Module):
  """torchvision's BasicConv2d: conv without bias, batch norm (inference), ReLU."""
  features: int
  kernel: tuple
  strides: tuple = (1, 1)
  padding: tuple = (0, 0)  # (pad_h, pad_w), symmetric as in PyTorch

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_exclude_pad(x):
  # TensorFlow's average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride):
  pad = 1 if stride == 1 else 0
  return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..e (FIDInceptionC): factorized 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, **row, name="branch7x7_2")(b7)
    b7 = ConvBN(192, **col, name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, **col, name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, **row, name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, **col, name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, **row, name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (pool="avg", FIDInceptionE_1) and Mixed_7c (pool="max", FIDInceptionE_2)."""
  pool: str

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = [ConvBN(384, **row, name="branch3x3_2a")(b3), ConvBN(384, **col, name="branch3x3_2b")(b3)]
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [ConvBN(384, **row, name="branch3x3dbl_3a")(bd),
          ConvBN(384, **col, name="branch3x3dbl_3b")(bd)]
    # The FID graph max-pools in the last block (an accident of the TF model, kept for FID).
    pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3 trunk. x: float [B, H, W, 3] in [-1, 1] (H, W >= 75) -> [B, 2048]."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def _bilinear_matrix(in_size, out_size):
  """[out, in] weights of PyTorch's bilinear resize with align_corners=False (no antialias).

  Source positions are rounded to float32 as PyTorch's CPU kernel does (float32 scale, one
  fused multiply-add), so the weights agree to the last bit rather than to ~1e-5.
  """
  f32 = np.float32
  scale = np.float64(f32(in_size) / f32(out_size))
  src = f32(np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0))
  lo = src.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1))
  m = np.zeros((out_size, in_size), f32)
  np.add.at(m, (np.arange(out_size), lo), f32(1) - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def resize_like_pytorch_fid(images, size=FID_RESOLUTION):
  """float [B, H, W, C] -> [B, size, size, C], as F.interpolate(bilinear, align_corners=False)."""
  _, h, w, _ = images.shape
  if (h, w) == (size, size):
    return images
  rows, cols = jnp.asarray(_bilinear_matrix(h, size)), jnp.asarray(_bilinear_matrix(w, size))
  hi = jax.lax.Precision.HIGHEST
  out = jnp.einsum("oh,bhwc->bowc", rows, images, precision=hi)
  return jnp.einsum("pw,bowc->bopc", cols, out, precision=hi)


def pool_features(variables, images):
  """pytorch-fid's InceptionV3 (default block, resize and normalize on) in Flax.

  Args:
    variables: {"params", "batch_stats"} of InceptionV3.
    images: float [B, H, W, 3] in [0, 1].
  Returns:
    float32 [B, 2048] pool3 features.
  """
  x = resize_like_pytorch_fid(jnp.asarray(images, jnp.float32))
  return InceptionV3().apply(variables, 2.0 * x - 1.0)


@functools.lru_cache(maxsize=1)
def variable_shapes():
  """{"params/.../kernel": shape} of InceptionV3's variables (traced once, nothing allocated)."""
  x = jax.ShapeDtypeStruct((1, FID_RESOLUTION, FID_RESOLUTION, 3), jnp.float32)
  abstract = jax.eval_shape(lambda x: InceptionV3().init(jax.random.PRNGKey(0), x), x)
  return {k: tuple(v.shape) for k, v in flatten_variables(abstract).items()}


def flatten_variables(variables):
  """{"params": {...}, "batch_stats": {...}} -> {"params/Mixed_5b/branch1x1/conv/kernel": array}."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(variables).items()}


def weights_hash(flat):
  """sha256 over the names, shapes and float32 bytes of a flat {name: array} (independent of
  the file it was read from)."""
  h = hashlib.sha256()
  for name in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[name], np.float32))
    h.update(f"{name}:{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def check_flat(flat, source):
  """Raises WeightsError naming `source` unless flat {name: array} matches InceptionV3 exactly."""
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  misshaped = sorted(f"{k}: file {tuple(flat[k].shape)}, network {expected[k]}"
                     for k in set(flat) & set(expected) if tuple(flat[k].shape) != expected[k])
  if missing or unexpected or misshaped:
    lines = [f"{source} does not hold FID InceptionV3 weights:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:10]) +
                     (" ..." if len(items) > 10 else ""))
    raise WeightsError("\n".join(lines))


def load_weights(path):
  """Reads and checks an Inception .npz -> (variables, weights_hash).

  Raises FileNotFoundError (with the conversion command) or WeightsError naming the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"Inception weights file {path!r} does not exist; convert pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth with `tfusion-convert-inception --input FILE.pth "
        f"--output {path}`")
  try:
    with np.load(path) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  except (ValueError, OSError, AttributeError) as e:
    raise WeightsError(f"{path}: not an .npz weights file ({e})") from None
  check_flat(flat, path)
  variables = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                                 for k, v in flat.items()})
  return variables, weights_hash(flat)


class FIDInception:
  """Pool3 features of image batches with weights from a file.

  `extractor(images)`: uint8 [N, H, W, 3] (0..255) or float in [0, 1] -> float32 [N, 2048],
  computed in batches of `batch_size` (the last one padded, so one compile per image size).
  `extractor.network` is the weights hash recorded with statistics.
  """

  def __init__(self, weights_path, batch_size=50):
    self.variables, self.network = load_weights(weights_path)
    self.weights_path = weights_path
    self.batch_size = batch_size
    self._features = jax.jit(pool_features)

  def __call__(self, images):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size].astype(np.float32)
      if images.dtype == np.uint8:
        chunk /= 255.0  # as torchvision's ToTensor in pytorch-fid
      pad = self.batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
      out.append(np.asarray(self._features(self.variables, chunk))[:len(chunk) - pad])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)
