"""A KL autoencoder with the architecture and parameter layout of diffusers' `AutoencoderKL`.

Images [N, H, W, 3] in [-1, 1] -> posterior moments (mean, logvar) [N, H/f, W/f, c] and back,
f = 2 ** (len(block_out_channels) - 1). Module names mirror the diffusers state dict
("encoder.down_blocks.0.resnets.1.conv1.weight" lives at
encoder/down_blocks_0_resnets_1/conv1/kernel), so loading weights is a mechanical mapping
(tfusion/vae/weights.py).

Levels are diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D` (resnets only) or their
`AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D` variants, which apply the mid block's
single-head self-attention after every resnet of the level (`down_blocks.{i}.attentions.{j}`;
taming's non-empty attn_resolutions and LlamaGen's VQ have them in the deepest level).
"""

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The subset of diffusers' AutoencoderKL config.json that fixes the architecture."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  # diffusers' block type per level (up: deepest first). None = all plain (no level attention);
  # a tuple of only plain blocks is stored as None, so equal architectures compare equal.
  down_block_types: Optional[Tuple[str, ...]] = None
  up_block_types: Optional[Tuple[str, ...]] = None

  def __post_init__(self):
    for key in _BLOCK_TYPES:
      kinds = getattr(self, key)
      if kinds is None:
        continue
      kinds = tuple(kinds)
      _check_block_types(key, kinds, len(self.block_out_channels), "VAEConfig")
      plain = _BLOCK_TYPES[key][0]
      object.__setattr__(self, key, None if set(kinds) == {plain} else kinds)

  @property
  def downsample_factor(self):
    return 2 ** (len(self.block_out_channels) - 1)

  def _types(self, key):
    return getattr(self, key) or (_BLOCK_TYPES[key][0],) * len(self.block_out_channels)

  @property
  def down_attention(self):
    """Per encoder level (full resolution first): whether it attends after each resnet."""
    return tuple(t == _BLOCK_TYPES["down_block_types"][1] for t in self._types("down_block_types"))

  @property
  def up_attention(self):
    """Per decoder block (deepest first, diffusers' up_blocks order): whether it attends."""
    return tuple(t == _BLOCK_TYPES["up_block_types"][1] for t in self._types("up_block_types"))

  @classmethod
  def from_dict(cls, d, source="VAE config"):
    """From a diffusers config.json dict (other keys ignored; unsupported blocks rejected with
    an error naming `source`, the config file, and the key)."""
    for key in _BLOCK_TYPES:
      if d.get(key) is not None:
        _check_block_types(key, tuple(d[key]),
                           len(d.get("block_out_channels") or cls.block_out_channels), source)
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"{source}: act_fn={d['act_fn']!r}: only 'silu' is supported")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names and v is not None}
    for key in ("block_out_channels", *_BLOCK_TYPES):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)

  def to_diffusers_dict(self):
    return {
        "_class_name": "AutoencoderKL", "in_channels": self.in_channels,
        "out_channels": self.out_channels,
        "down_block_types": list(self._types("down_block_types")),
        "up_block_types": list(self._types("up_block_types")),
        "block_out_channels": list(self.block_out_channels),
        "layers_per_block": self.layers_per_block, "act_fn": "silu",
        "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
        "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
        "mid_block_add_attention": self.mid_block_add_attention,
    }


# key -> (plain block, block with attention after each resnet), diffusers' names.
_BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}


def _check_block_types(key, kinds, levels, source):
  unknown = sorted(set(kinds) - set(_BLOCK_TYPES[key]))
  if unknown:
    raise ValueError(f"{source}: {key} has {unknown}; supported: {list(_BLOCK_TYPES[key])}")
  if len(kinds) != levels:
    raise ValueError(f"{source}: {key} names {len(kinds)} blocks for {levels} levels "
                     "(block_out_channels)")


def _conv(features, kernel, name, padding=1, strides=1):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((padding, padding), (padding, padding)), name=name)


def _norm(groups, name):
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, "conv1")(nn.silu(_norm(self.groups, "norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.silu(_norm(self.groups, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", padding=0)(x)
    return x + h


class SpatialAttention(nn.Module):
  """Single-head self-attention over the H*W positions, with a residual (diffusers Attention)."""
  groups: int

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    y = _norm(self.groups, "group_norm")(x).reshape(n, h * w, c)
    q = nn.Dense(c, name="to_q")(y)
    k = nn.Dense(c, name="to_k")(y)
    v = nn.Dense(c, name="to_v")(y)
    weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / jnp.sqrt(c).astype(q.dtype), -1)
    out = nn.Dense(c, name="to_out_0")(jnp.einsum("nqk,nkc->nqc", weights, v))
    return x + out.reshape(n, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.groups, name="resnets_0")(x)
    if self.attention:
      x = SpatialAttention(self.groups, name="attentions_0")(x)
    return ResnetBlock(self.channels, self.groups, name="resnets_1")(x)


class Downsample(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # diffusers pads right/bottom, then stride 2
    return _conv(self.channels, 3, "conv", padding=0, strides=2)(x)


class Upsample(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
    return _conv(self.channels, 3, "conv")(x)


class Encoder(nn.Module):
  """images -> 2 * latent_channels moments (mean, logvar), or latent_channels vectors when
  double_z is False (a VQ encoder, as diffusers' VQModel)."""
  config: VAEConfig
  double_z: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    x = _conv(cfg.block_out_channels[0], 3, "conv_in")(x)
    for i, ch in enumerate(cfg.block_out_channels):
      block = f"down_blocks_{i}"
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(ch, cfg.norm_num_groups, name=f"{block}_resnets_{j}")(x)
        if cfg.down_attention[i]:
          x = SpatialAttention(cfg.norm_num_groups, name=f"{block}_attentions_{j}")(x)
      if i + 1 < len(cfg.block_out_channels):
        x = Downsample(ch, name=f"{block}_downsamplers_0")(x)
    x = MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                 name="mid_block")(x)
    x = nn.silu(_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv((2 if self.double_z else 1) * cfg.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    channels = list(reversed(cfg.block_out_channels))
    x = _conv(channels[0], 3, "conv_in")(z)
    x = MidBlock(channels[0], cfg.norm_num_groups, cfg.mid_block_add_attention,
                 name="mid_block")(x)
    for i, ch in enumerate(channels):
      block = f"up_blocks_{i}"
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(ch, cfg.norm_num_groups, name=f"{block}_resnets_{j}")(x)
        if cfg.up_attention[i]:
          x = SpatialAttention(cfg.norm_num_groups, name=f"{block}_attentions_{j}")(x)
      if i + 1 < len(channels):
        x = Upsample(ch, name=f"{block}_upsamplers_0")(x)
    x = nn.silu(_norm(cfg.norm_num_groups, "conv_norm_out")(x))
    return _conv(cfg.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """encode(images) -> (mean, logvar); decode(z) -> images. NHWC, float32."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", padding=0)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", padding=0)

  def encode(self, images):
    """images [N, H, W, in_channels] -> (mean, logvar) each [N, H/f, W/f, latent_channels]."""
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """z [N, h, w, latent_channels] (unnormalized) -> images [N, h*f, w*f, out_channels]."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images, rng=None):
    """Reconstruction through a posterior sample (or the mean without rng)."""
    mean, logvar = self.encode(images)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self.decode(z), mean, logvar
