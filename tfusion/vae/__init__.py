"""The project's VAE: load (diffusers format), encode to normalized latents, decode, save.

A VAE directory holds diffusers' files — config.json and diffusion_pytorch_model.safetensors —
and optionally tfusion_latent_stats.json (per-channel latent mean/std computed on your data by
`tfusion-vae-stats`). Normalized latents are (z - shift) * scale, with per-channel statistics
when present (shift = mean, scale = 1 / std), otherwise diffusers' `shift_factor` and
`scaling_factor` from config.json. The latent precompute job and image decoding at sampling
time both go through `VAE.encode` / `VAE.decode`, so they agree by construction.
"""

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tfusion.vae.model import AutoencoderKL, VAEConfig  # noqa: F401 (public API)
from tfusion.vae import weights as weights_lib

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
STATS_FILE = "tfusion_latent_stats.json"


@functools.lru_cache(maxsize=None)
def _jitted(config):
  model = AutoencoderKL(config)

  @jax.jit
  def encode(params, images, shift, scale, rng):
    mean, logvar = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) if rng is not None \
        else mean
    return (z - shift) * scale

  @jax.jit
  def encode_mean(params, images, shift, scale):
    mean, _ = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    return (mean - shift) * scale

  @jax.jit
  def decode(params, latents, shift, scale):
    z = latents / scale + shift
    return model.apply({"params": params}, z, method=AutoencoderKL.decode)

  return encode, encode_mean, decode


@dataclasses.dataclass(frozen=True)
class VAE:
  """A VAE with its parameters and latent normalization (scale, shift: scalars or [c])."""
  config: VAEConfig
  params: Any
  scale: Any = 1.0
  shift: Any = 0.0

  @property
  def downsample_factor(self):
    return self.config.downsample_factor

  @property
  def latent_channels(self):
    return self.config.latent_channels

  def _norm(self):
    return (jnp.asarray(self.shift, jnp.float32), jnp.asarray(self.scale, jnp.float32))

  def encode(self, images, rng=None):
    """images float [N, H, W, 3] in [-1, 1] -> normalized latents [N, H/f, W/f, c].

    The posterior mean, or a posterior sample when `rng` is given.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(f"VAE.encode expects [N, H, W, {self.config.in_channels}] images, got "
                       f"{images.shape}")
    f = self.downsample_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"image size {images.shape[1:3]} is not divisible by the VAE's "
                       f"downsampling factor {f}")
    encode, encode_mean, _ = _jitted(self.config)
    shift, scale = self._norm()
    if rng is None:
      return encode_mean(self.params, images, shift, scale)
    return encode(self.params, images, shift, scale, rng)

  def decode(self, latents):
    """Normalized latents [N, h, w, c] -> images float [N, h*f, w*f, 3] (about [-1, 1])."""
    _, _, decode = _jitted(self.config)
    shift, scale = self._norm()
    return decode(self.params, jnp.asarray(latents, jnp.float32), shift, scale)

  def with_stats(self, mean, std):
    """The same VAE normalizing with per-channel statistics of raw latents."""
    return dataclasses.replace(self, shift=np.asarray(mean, np.float32),
                               scale=1.0 / np.maximum(np.asarray(std, np.float32), 1e-6))


def init_vae(config, seed=0):
  """A randomly initialised VAE (for training from scratch and tests)."""
  return VAE(config, host_init(abstract_params(config), seed))


def host_init(abstract, seed=0):
  """Random params for the abstract tree of a conv autoencoder, made on the host with numpy
  (LeCun-normal kernels, zero biases, unit norm scales, as Flax's defaults): compiling Flax's
  jitted init of a conv net takes tens of seconds on CPU."""
  import flax
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract)
  params = {}
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    elif path[-1] == "scale":
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    params[path] = jnp.asarray(value, jnp.float32)
  return flax.traverse_util.unflatten_dict(params)


def abstract_params(config):
  size = 8 * config.downsample_factor
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, size, size, config.in_channels)))["params"]


def load_vae(path):
  """Loads a VAE from a diffusers-format directory, or a .safetensors file beside config.json."""
  if not path:
    raise ValueError("a VAE path is required (no downloads): a diffusers-format directory")
  if os.path.isdir(path):
    directory, weights_path = path, os.path.join(path, WEIGHTS_FILE)
  else:
    directory, weights_path = os.path.dirname(path), path
  config_path = os.path.join(directory, CONFIG_FILE)
  for needed in (config_path, weights_path):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"VAE file {needed} does not exist")
  with open(config_path, encoding="utf-8") as f:
    raw = json.load(f)
  config = VAEConfig.from_dict(raw, source=config_path)
  from safetensors.numpy import load_file
  state = load_file(weights_path)
  params = weights_lib.state_dict_to_params(state, abstract_params(config), source=weights_path)
  scale = float(raw.get("scaling_factor") or 1.0)
  shift = float(raw.get("shift_factor") or 0.0)
  if raw.get("latents_mean") is not None and raw.get("latents_std") is not None:
    # Per-channel VAEs (e.g. Playground v2.5's): pipelines use (z - mean) * scaling_factor / std.
    mean, std = (np.asarray(raw[k], np.float32) for k in ("latents_mean", "latents_std"))
    if mean.shape != (config.latent_channels,) or std.shape != (config.latent_channels,):
      raise ValueError(f"{config_path}: latents_mean/latents_std need {config.latent_channels} "
                       f"values each, got {mean.shape} and {std.shape}")
    shift, scale = mean, scale / std
  vae = VAE(config, jax.tree.map(jnp.asarray, params), scale=scale, shift=shift)
  stats_path = os.path.join(directory, STATS_FILE)
  if os.path.exists(stats_path):
    with open(stats_path, encoding="utf-8") as f:
      stats = json.load(f)
    if len(stats["mean"]) != config.latent_channels:
      raise ValueError(f"{stats_path} holds statistics for {len(stats['mean'])} channels; the VAE "
                       f"has {config.latent_channels}")
    vae = vae.with_stats(stats["mean"], stats["std"])
  return vae


def save_vae(vae, path):
  """Writes diffusers-format files (+ per-channel stats if the VAE has them) into `path`."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  cfg = vae.config.to_diffusers_dict()
  per_channel = np.ndim(vae.scale) > 0 or np.ndim(vae.shift) > 0
  cfg["scaling_factor"] = 1.0 if per_channel else float(vae.scale)
  cfg["shift_factor"] = 0.0 if per_channel else float(vae.shift)
  state = {k: np.ascontiguousarray(v, np.float32)
           for k, v in weights_lib.params_to_state_dict(jax.device_get(vae.params)).items()}
  save_file(state, os.path.join(path, WEIGHTS_FILE))
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2)
  stats_path = os.path.join(path, STATS_FILE)
  if per_channel:
    c = vae.config.latent_channels
    with open(stats_path, "w", encoding="utf-8") as f:
      json.dump({"mean": np.broadcast_to(np.asarray(vae.shift, np.float64), (c,)).tolist(),
                 "std": np.broadcast_to(1.0 / np.asarray(vae.scale, np.float64), (c,)).tolist()},
                f)
  elif os.path.exists(stats_path):  # stale statistics would override this VAE's normalization
    os.remove(stats_path)
