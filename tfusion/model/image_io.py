"""Image input and output layers: latents <-> patch vectors of the transformer's width.

Two families from the paper: "linear" (patchify + one dense layer, timestep embedding added to
each patch vector) and "unet" (U-Net down blocks before patchifying, up blocks with skip
connections after; plain LayerNorm with the timestep embedding added as a bias, no AdaLN).
Images are handled per slot: latents [B, M, h, w, c] -> patch vectors [B, M, N, d] with
N = (h / p) * (w / p) patches in row-major order, and back.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def patchify(latents, patch_size):
  """[..., h, w, c] -> [..., (h/p)*(w/p), p*p*c], patches row-major, each patch (py, px, c)."""
  *lead, h, w, c = latents.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"latent size {h}x{w} is not divisible by patch_size={p}")
  x = latents.reshape(*lead, h // p, p, w // p, p, c)
  x = jnp.moveaxis(x, -4, -3)  # [..., h/p, w/p, p, p, c]
  return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size, height, width):
  """Inverse of `patchify`: [..., N, p*p*c] -> [..., h, w, c]."""
  *lead, n, dim = patches.shape
  p = patch_size
  c = dim // (p * p)
  if n != (height // p) * (width // p):
    raise ValueError(f"{n} patches do not tile a {height}x{width} latent with patch_size={p}")
  x = patches.reshape(*lead, height // p, width // p, p, p, c)
  x = jnp.moveaxis(x, -3, -4)  # [..., h/p, p, w/p, p, c]
  return x.reshape(*lead, height, width, c)


def sinusoidal_embedding(t, dim, max_period=10000.0):
  """Sinusoidal features of continuous times. t: [...] in [0, 1] -> [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, names, dtype, name):
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class TimestepEmbedding(nn.Module):
  """t in [0, 1] (shape [...]) -> [..., d] through sinusoids and a 2-layer MLP."""
  d_model: int
  freq_dim: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    x = sinusoidal_embedding(t, self.freq_dim).astype(self.dtype)
    x = nn.silu(_dense(self.d_model, (None, "embed"), self.dtype, "fc1")(x))
    return _dense(self.d_model, ("embed", "embed_out"), self.dtype, "fc2")(x)


class PatchPositions(nn.Module):
  """A learned embedding per patch position inside an image: [N, d]."""
  num_patches: int
  d_model: int

  @nn.compact
  def __call__(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patches", "embed"))
    return self.param("embedding", init, (self.num_patches, self.d_model))


class LinearEncoder(nn.Module):
  """Noisy latents [B, M, h, w, c] + time embedding [B, M, d] -> patch vectors [B, M, N, d]."""
  d_model: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, temb):
    patches = patchify(latents.astype(self.dtype), self.patch_size)
    x = _dense(self.d_model, ("patch_dim", "embed"), self.dtype, "proj")(patches)
    pos = PatchPositions(patches.shape[-2], self.d_model, name="pos")()
    return x + temb[:, :, None, :] + pos.astype(self.dtype), None


class LinearDecoder(nn.Module):
  """Trunk outputs at the patches [B, M, N, d] -> predicted latents [B, M, h, w, c]."""
  patch_size: int
  height: int
  width: int
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, temb, skips):
    del temb, skips
    dim = self.patch_size * self.patch_size * self.channels
    out = _dense(dim, ("embed", "patch_dim"), self.dtype, "proj")(h)
    return unpatchify(out.astype(jnp.float32), self.patch_size, self.height, self.width)


# ----------------------------------------------------------------------------------- U-Net


def _conv(features, kernel, name, strides=1):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME", name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class ResBlock(nn.Module):
  """LayerNorm -> SiLU -> conv, + timestep bias, LayerNorm -> SiLU -> conv, + residual."""
  features: int

  @nn.compact
  def __call__(self, x, temb):  # x [n, H, W, C], temb [n, d]
    h = _conv(self.features, 3, "conv1")(nn.silu(nn.LayerNorm(name="norm1")(x)))
    h = h + _dense(self.features, ("embed", "conv_out"), jnp.float32, "temb")(
        nn.silu(temb))[:, None, None, :]
    h = _conv(self.features, 3, "conv2")(nn.silu(nn.LayerNorm(name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, "skip")(x)
    return x + h


def unet_levels(channels: Sequence[int], patch_size: int):
  """Channel widths per U-Net level: one level per 2x downsampling of the patch, plus the input."""
  levels = int(round(math.log2(patch_size))) + 1
  if 2 ** (levels - 1) != patch_size:
    raise ValueError(f"patch_size must be a power of two for the U-Net, got {patch_size}")
  if len(channels) < levels:
    raise ValueError(f"config.model.image.unet_channels={tuple(channels)} has fewer than the "
                     f"{levels} levels patch_size={patch_size} needs")
  return tuple(channels[:levels])


class UNetEncoder(nn.Module):
  """U-Net down path: latents [B, M, h, w, c] -> patch vectors [B, M, N, d] and skips.

  Downsamples log2(patch_size) times so each remaining pixel is one patch (row-major).
  """
  d_model: int
  patch_size: int
  channels: Sequence[int]
  blocks_per_level: int

  @nn.compact
  def __call__(self, latents, temb):
    b, m, hh, ww, c = latents.shape
    x = latents.reshape(b * m, hh, ww, c).astype(jnp.float32)
    t = temb.reshape(b * m, -1).astype(jnp.float32)
    levels = unet_levels(self.channels, self.patch_size)
    x = _conv(levels[0], 3, "conv_in")(x)
    skips = []
    for i, ch in enumerate(levels):
      for j in range(self.blocks_per_level):
        x = ResBlock(ch, name=f"down{i}_res{j}")(x, t)
      skips.append(x)
      if i + 1 < len(levels):
        x = _conv(levels[i + 1], 3, f"down{i}_downsample", strides=2)(x)
    n_h, n_w = x.shape[1], x.shape[2]
    x = _dense(self.d_model, ("conv_out", "embed"), jnp.float32, "proj")(
        nn.LayerNorm(name="norm_out")(x))
    pos = PatchPositions(n_h * n_w, self.d_model, name="pos")()
    x = x.reshape(b, m, n_h * n_w, self.d_model) + temb[:, :, None, :] + pos
    return x, skips


class UNetDecoder(nn.Module):
  """U-Net up path: [B, M, N, d] (+ skips from the encoder) -> predicted latents [B, M, h, w, c]."""
  patch_size: int
  height: int
  width: int
  out_channels: int
  channels: Sequence[int]
  blocks_per_level: int

  @nn.compact
  def __call__(self, h, temb, skips):
    b, m, n, _ = h.shape
    levels = unet_levels(self.channels, self.patch_size)
    p = self.patch_size
    t = temb.reshape(b * m, -1).astype(jnp.float32)
    x = _dense(levels[-1], ("embed", "conv_out"), jnp.float32, "proj")(h.astype(jnp.float32))
    x = x.reshape(b * m, self.height // p, self.width // p, levels[-1])
    for i in reversed(range(len(levels))):
      x = jnp.concatenate([x, skips[i]], axis=-1)
      for j in range(self.blocks_per_level):
        x = ResBlock(levels[i], name=f"up{i}_res{j}")(x, t)
      if i > 0:
        n_, hh, ww, cc = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (n_, hh, 2, ww, 2, cc)).reshape(
            n_, hh * 2, ww * 2, cc)
        x = _conv(levels[i - 1], 3, f"up{i}_upsample")(x)
    x = _conv(self.out_channels, 3, "conv_out")(nn.silu(nn.LayerNorm(name="norm_out")(x)))
    return x.reshape(b, m, self.height, self.width, self.out_channels)
