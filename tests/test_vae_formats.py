"""Loading VAEs saved in older layouts, normalization metadata, and more image formats.

No jit compiles here: loads are compared parameter by parameter.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae.model import VAEConfig

CONFIG = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                   norm_num_groups=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A random VAE saved in the current diffusers layout: (directory, its diffusers state dict)."""
  path = str(tmp_path_factory.mktemp("vae"))
  vae_lib.save_vae(vae_lib.init_vae(CONFIG, seed=1), path)
  return path, load_file(os.path.join(path, vae_lib.WEIGHTS_FILE))


def _write(directory, state, config_dir, weights_name=vae_lib.WEIGHTS_FILE, **config_updates):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(config_dir, vae_lib.CONFIG_FILE)) as f:
    cfg = json.load(f)
  cfg.update(config_updates)
  with open(os.path.join(directory, vae_lib.CONFIG_FILE), "w") as f:
    json.dump(cfg, f)
  save_file(state, os.path.join(directory, weights_name))
  return os.path.join(directory, weights_name)


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _to_ldm(state, num_levels):
  """diffusers names -> CompVis/LDM single-file names (attention projections as 1x1 convs)."""
  out = {}
  for key, value in state.items():
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", k)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
    k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)",
               lambda m: f"up.{num_levels - 1 - int(m[1])}.block.{m[2]}", k)
    k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0",
               lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample", k)
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    attention = re.match(r"(.*)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
                         r"\.(weight|bias)$", key)
    if attention:
      name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
              "to_out.0": "proj_out"}[attention[2]]
      k = f"{attention[1]}.mid.attn_1.{name}.{attention[3]}"
      if value.ndim == 2:
        value = value[:, :, None, None]
    out[k] = value
  return out


def test_loads_pre_0_14_diffusers_attention_names(saved, tmp_path):
  path, state = saved
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  old = {}
  for key, value in state.items():
    for new_name, old_name in renames.items():
      key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
    old[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
  _write(str(tmp_path), old, path)
  _assert_same_params(vae_lib.load_vae(str(tmp_path)).params, vae_lib.load_vae(path).params)


@pytest.mark.crosscheck
def test_loads_ldm_single_file_inside_a_full_checkpoint(saved, tmp_path):
  single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
  convert_ldm_vae_checkpoint = single_file_utils.convert_ldm_vae_checkpoint
  path, state = saved
  ldm = {f"first_stage_model.{k}": v for k, v in _to_ldm(state, 3).items()}
  ldm["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)
  # The test's LDM dict is genuine: diffusers' own converter maps it back to the original.
  with open(os.path.join(path, vae_lib.CONFIG_FILE)) as f:
    back = convert_ldm_vae_checkpoint(ldm, json.load(f))
  assert sorted(back) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(np.asarray(back[key]), state[key])
  weights = _write(str(tmp_path), ldm, path, weights_name="sd-checkpoint.safetensors")
  _assert_same_params(vae_lib.load_vae(weights).params, vae_lib.load_vae(path).params)


def test_latents_mean_std_in_config_normalize_per_channel(saved, tmp_path):
  path, state = saved
  _write(str(tmp_path), state, path, scaling_factor=0.5, latents_mean=[1, 2, 3, 4],
         latents_std=[1, 2, 4, 8])
  vae = vae_lib.load_vae(str(tmp_path))  # diffusers pipelines: (z - mean) * sf / std
  np.testing.assert_allclose(vae.shift, [1, 2, 3, 4])
  np.testing.assert_allclose(vae.scale, [0.5, 0.25, 0.125, 0.0625])
  _write(str(tmp_path), state, path, latents_mean=[0.0] * 3, latents_std=[1.0] * 3)
  with pytest.raises(ValueError, match="config.json: latents_mean/latents_std need 4"):
    vae_lib.load_vae(str(tmp_path))


def test_saving_scalar_normalization_removes_stale_statistics(saved, tmp_path):
  vae = vae_lib.load_vae(saved[0])
  vae_lib.save_vae(vae.with_stats([5.0] * 4, [2.0] * 4), str(tmp_path))
  assert os.path.exists(tmp_path / vae_lib.STATS_FILE)
  vae_lib.save_vae(vae, str(tmp_path))  # scale 1, shift 0: the statistics file must go
  again = vae_lib.load_vae(str(tmp_path))
  assert np.ndim(again.scale) == 0 and again.scale == 1.0 and again.shift == 0.0


def test_more_image_formats(tmp_path):
  Image.fromarray(np.full((6, 6), 65535 // 4, np.uint16)).save(tmp_path / "gray16.png")
  out = images_lib.load_image(str(tmp_path / "gray16.png"), 4)  # not clipped to white
  np.testing.assert_allclose(out, 64 / 127.5 - 1, atol=1e-6)
  # EXIF orientation 6: viewers rotate the stored 2x4 image 90 degrees clockwise (to 4x2), so
  # its white column x=1 becomes row 1, the first row of the centered 2x2 crop.
  pixels = np.zeros((2, 4, 3), np.uint8)
  pixels[:, 1] = 255
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
  out = images_lib.load_image(str(tmp_path / "rotated.png"), 2)
  assert out[0].min() == 1.0 and out[1].max() == -1.0
  np.testing.assert_allclose(
      images_lib.array_to_model_input(np.full((4, 4), 65535, np.uint16), 4), 1.0)
  np.testing.assert_allclose(
      images_lib.array_to_model_input(np.zeros((4, 4), bool), 4), -1.0)
  (tmp_path / "cut.png").write_bytes((tmp_path / "gray16.png").read_bytes()[:40])
  with pytest.raises(images_lib.BadImageError, match="cut.png"):
    images_lib.load_image(str(tmp_path / "cut.png"), 4)
