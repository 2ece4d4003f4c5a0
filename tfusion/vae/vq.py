"""The VQ-VAE of the Chameleon baseline: images -> discrete codes -> images.

Layout of diffusers' `VQModel`: the project VAE's encoder with one set of outputs
(latent_channels, no logvar), a 1x1 `quant_conv` to the code dimension, the codebook
(tfusion/vae/quantizer.py), a 1x1 `post_quant_conv` back to latent_channels, and the decoder.
A 256x256 image through an 8x-downsampling VQ-VAE is 32x32 = 1,024 codes (the paper's).

A VQ-VAE directory holds config.json (`_class_name: VQModel`, `num_vq_embeddings`,
`vq_embed_dim` and the encoder/decoder keys) and diffusion_pytorch_model.safetensors with the
codebook as `quantize.embedding.weight` [K, D] beside the conv weights.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tfusion.vae import quantizer, weights as weights_lib
from tfusion.vae.model import Decoder, Encoder, VAEConfig, _conv

CODEBOOK_KEY = "quantize.embedding.weight"
CLASS_NAME = "VQModel"


class VQAutoencoder(nn.Module):
  """encode(images) -> pre-quantization vectors [N, h, w, code_dim]; decode(vectors) -> images.
  The codebook is not a parameter of this module (it is trained by EMA, not gradients)."""
  config: VAEConfig
  code_dim: int

  def setup(self):
    self.encoder = Encoder(self.config, double_z=False)
    self.quant_conv = _conv(self.code_dim, 1, "quant_conv", padding=0)
    self.post_quant_conv = _conv(self.config.latent_channels, 1, "post_quant_conv", padding=0)
    self.decoder = Decoder(self.config)

  def encode(self, images):
    return self.quant_conv(self.encoder(images))

  def decode(self, z_q):
    return self.decoder(self.post_quant_conv(z_q))

  def __call__(self, images):
    return self.decode(self.encode(images))


def abstract_params(config, code_dim):
  size = 8 * config.downsample_factor
  return jax.eval_shape(VQAutoencoder(config, code_dim).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, size, size, config.in_channels)))["params"]


@functools.lru_cache(maxsize=None)
def _jitted(config, code_dim, l2_norm=False):
  model = VQAutoencoder(config, code_dim)

  @jax.jit
  def encode_codes(params, codebook, images):
    z = model.apply({"params": params}, images, method=VQAutoencoder.encode)
    return quantizer.nearest_codes(z, codebook, l2_norm=l2_norm)

  @jax.jit
  def decode_codes(params, codebook, codes):
    if l2_norm:
      codebook = quantizer.l2_normalize(codebook)
    z_q = quantizer.lookup(codes, codebook)
    return model.apply({"params": params}, z_q, method=VQAutoencoder.decode)

  return encode_codes, decode_codes


@dataclasses.dataclass(frozen=True)
class VQVAE:
  """A trained VQ-VAE: conv params and the codebook [num_codes, code_dim].

  codebook_l2_norm (LlamaGen's VQ): codes are chosen by cosine similarity (z and the entries
  L2-normalised before the nearest-code search) and decode the normalised entries.
  """
  config: VAEConfig
  params: Any
  codebook: Any
  codebook_l2_norm: bool = False

  @property
  def num_codes(self):
    return int(self.codebook.shape[0])

  @property
  def code_dim(self):
    return int(self.codebook.shape[1])

  @property
  def downsample_factor(self):
    return self.config.downsample_factor

  def encode_codes(self, images):
    """images float [N, H, W, 3] in [-1, 1] -> codes int32 [N, H/f, W/f]."""
    images = jnp.asarray(images, jnp.float32)
    f = self.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"VQVAE.encode_codes expects [N, H, W, 3] images with H, W divisible by "
                       f"{f}, got {images.shape}")
    return _jitted(self.config, self.code_dim, self.codebook_l2_norm)[0](
        self.params, self.codebook, images)

  def decode_codes(self, codes, where="codes"):
    """codes int [N, h, w] -> images float [N, h*f, w*f, 3]; out-of-range codes are an error
    naming `where`."""
    quantizer.check_codes(codes, self.num_codes, where)
    return _jitted(self.config, self.code_dim, self.codebook_l2_norm)[1](
        self.params, self.codebook, jnp.asarray(codes, jnp.int32))


def config_dict(vq):
  """diffusers-style VQModel config.json for `vq`."""
  cfg = vq.config.to_diffusers_dict()
  cfg.update(_class_name=CLASS_NAME, num_vq_embeddings=vq.num_codes, vq_embed_dim=vq.code_dim)
  for key in ("use_quant_conv", "use_post_quant_conv"):
    cfg.pop(key, None)
  if vq.codebook_l2_norm:  # a tfusion key (diffusers ignores it); absent means False
    cfg["codebook_l2_norm"] = True
  return cfg


def save_vq(vq, path):
  """Writes config.json and the safetensors weights (codebook included) into `path`."""
  from safetensors.numpy import save_file
  from tfusion import vae as vae_lib
  os.makedirs(path, exist_ok=True)
  state = {k: np.ascontiguousarray(v, np.float32)
           for k, v in weights_lib.params_to_state_dict(jax.device_get(vq.params)).items()}
  state[CODEBOOK_KEY] = np.ascontiguousarray(jax.device_get(vq.codebook), np.float32)
  save_file(state, os.path.join(path, vae_lib.WEIGHTS_FILE))
  with open(os.path.join(path, vae_lib.CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config_dict(vq), f, indent=2)


def load_vq(path):
  """Loads a VQ-VAE directory written by save_vq (or a diffusers VQModel of the same layout)."""
  from safetensors.numpy import load_file
  from tfusion import vae as vae_lib
  config_path = os.path.join(path, vae_lib.CONFIG_FILE)
  weights_path = os.path.join(path, vae_lib.WEIGHTS_FILE)
  for needed in (config_path, weights_path):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"VQ-VAE file {needed} does not exist")
  with open(config_path, encoding="utf-8") as f:
    raw = json.load(f)
  if raw.get("_class_name") != CLASS_NAME:
    raise ValueError(f"{config_path} describes a {raw.get('_class_name')!r}, not a {CLASS_NAME} "
                     "(a continuous VAE loads with tfusion.vae.load_vae)")
  if raw.get("norm_type", "group") != "group":  # MoVQ's spatial norm: a different decoder
    raise ValueError(f"{config_path}: norm_type={raw['norm_type']!r}; only 'group' is supported")
  config = VAEConfig.from_dict(raw, source=config_path)
  state = load_file(weights_path)
  if CODEBOOK_KEY not in state:
    raise weights_lib.WeightMismatchError(f"{weights_path} has no codebook ({CODEBOOK_KEY})")
  codebook = state.pop(CODEBOOK_KEY)
  # diffusers' VQModel: vq_embed_dim None means latent_channels.
  want = (raw["num_vq_embeddings"], raw.get("vq_embed_dim") or config.latent_channels)
  if tuple(codebook.shape) != want:
    raise weights_lib.WeightMismatchError(
        f"{weights_path}: codebook {tuple(codebook.shape)}, config.json says {want} "
        "(num_vq_embeddings, vq_embed_dim)")
  params = weights_lib.state_dict_to_params(state, abstract_params(config, want[1]),
                                            source=weights_path)
  return VQVAE(config, jax.tree.map(jnp.asarray, params), jnp.asarray(codebook),
               codebook_l2_norm=bool(raw.get("codebook_l2_norm", False)))
