"""The VAE: diffusers equivalence, loading errors, image conversion, training, round trips."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from tfusion import vae as vae_lib
from tfusion.vae import images as images_lib
from tfusion.vae import stats as stats_lib
from tfusion.vae import train as train_lib
from tfusion.vae import weights as weights_lib
from tfusion.vae.model import VAEConfig

SMALL = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8)


_PLAIN = (("DownEncoderBlock2D",) * 3, ("UpDecoderBlock2D",) * 3)
# Level attention (Attn*Block2D) at levels that are not mirror images of each other: encoder
# levels 0 and 2, decoder up_blocks 1 and 2 (deepest first: resolutions 1 and 0).
_ATTENTION = (("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              ("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D"))


@pytest.mark.crosscheck
@pytest.mark.parametrize("block_types", [_PLAIN, _ATTENTION], ids=["plain", "level_attention"])
def test_matches_diffusers_autoencoderkl(block_types, tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=block_types[0],
      up_block_types=block_types[1], block_out_channels=(16, 32, 32),
      layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
  with torch.no_grad():  # move every tensor (norms included) off its default init
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  vae = vae_lib.load_vae(str(tmp_path))
  assert vae.scale == pytest.approx(0.18215) and vae.config.downsample_factor == 4
  assert vae.config.down_attention == tuple(t.startswith("Attn") for t in block_types[0])
  assert vae.config.up_attention == tuple(t.startswith("Attn") for t in block_types[1])

  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).standard_normal((2, 4, 4, 4)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    ref_mean = post.mean.permute(0, 2, 3, 1).numpy()
    ref_logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    ref_images = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
  model = vae_lib.AutoencoderKL(vae.config)
  mean, logvar = model.apply({"params": vae.params}, x, method=vae_lib.AutoencoderKL.encode)
  images = model.apply({"params": vae.params}, z, method=vae_lib.AutoencoderKL.decode)
  # float32 on both sides with the same op order up to reassociation: ~1e-5 of O(1) values.
  # Measured max abs diffs: moments 4e-6, decoder 7e-6.
  np.testing.assert_allclose(mean, ref_mean, atol=5e-5)
  np.testing.assert_allclose(logvar, ref_logvar, atol=5e-5)
  np.testing.assert_allclose(images, ref_images.numpy(), atol=5e-5)
  # The normalized API applies diffusers' scaling factor.
  np.testing.assert_allclose(vae.encode(x), ref_mean * 0.18215, atol=2e-5)
  # save_vae writes the block types back: diffusers reads our directory as the same model.
  vae_lib.save_vae(vae, str(tmp_path / "ours"))
  again = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "ours")).eval()
  assert list(again.config.down_block_types) == list(block_types[0])
  assert list(again.config.up_block_types) == list(block_types[1])
  ours, theirs = again.state_dict(), ref.state_dict()
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key].numpy(), theirs[key].numpy())


def test_unknown_block_types_are_refused_naming_the_file_and_key(tmp_path):
  vae_lib.save_vae(vae_lib.init_vae(SMALL), str(tmp_path))
  config_path = os.path.join(tmp_path, vae_lib.CONFIG_FILE)
  with open(config_path) as f:
    cfg = json.load(f)
  for key, kinds, match in (
      ("up_block_types", ["UpDecoderBlock2D", "AttnUpBlock2D"],
       r"up_block_types has \['AttnUpBlock2D'\]; supported: \['UpDecoderBlock2D', "
       r"'AttnUpDecoderBlock2D'\]"),
      ("down_block_types", ["AttnDownEncoderBlock2D"] * 3,
       r"down_block_types names 3 blocks for 2 levels \(block_out_channels\)")):
    with open(config_path, "w") as f:
      json.dump({**cfg, key: kinds}, f)
    with pytest.raises(ValueError, match=re.escape(config_path) + ": " + match):
      vae_lib.load_vae(str(tmp_path))
  # The plain types spelled out are the default: the same config as one without the keys.
  assert VAEConfig.from_dict({**cfg, "down_block_types": None}) == VAEConfig.from_dict(cfg) == \
      SMALL


def test_mismatched_weights_list_every_problem(tmp_path):
  vae = vae_lib.init_vae(SMALL)
  vae_lib.save_vae(vae, str(tmp_path))
  from safetensors.numpy import load_file, save_file
  path = os.path.join(tmp_path, vae_lib.WEIGHTS_FILE)
  state = load_file(path)
  del state["encoder.conv_in.weight"]
  state["encoder.extra.weight"] = np.zeros(3, np.float32)
  state["decoder.conv_out.bias"] = np.zeros(7, np.float32)
  save_file(state, path)
  with pytest.raises(weights_lib.WeightMismatchError) as e:
    vae_lib.load_vae(str(tmp_path))
  message = str(e.value)
  assert path in message
  assert "missing (1): encoder.conv_in.weight" in message
  assert "unexpected (1): encoder.extra.weight" in message
  assert "mis-shaped (1): decoder.conv_out.bias: file (7,), model expects (3,)" in message


def test_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    vae_lib.load_vae(str(tmp_path))
  with pytest.raises(ValueError, match="path is required"):
    vae_lib.load_vae("")


def test_save_load_round_trip_keeps_outputs_and_normalization(tmp_path):
  vae = vae_lib.init_vae(SMALL).with_stats([1.0, -1.0, 0.5, 0.0], [2.0, 1.0, 0.5, 1.0])
  vae_lib.save_vae(vae, str(tmp_path))
  loaded = vae_lib.load_vae(str(tmp_path))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(loaded.encode(x), vae.encode(x), atol=1e-6)
  z = loaded.encode(x)
  np.testing.assert_allclose(loaded.decode(z), vae.decode(z), atol=1e-6)
  raw = vae_lib.VAE(vae.config, vae.params).encode(x)
  np.testing.assert_allclose(z, (raw - np.array([1.0, -1.0, 0.5, 0.0])) / np.array([2, 1, .5, 1]),
                             atol=1e-5)


def test_image_conversion_and_bad_images(tmp_path):
  gray = Image.fromarray(np.full((10, 20), 255, np.uint8), mode="L")
  gray.save(tmp_path / "gray.png")
  rgba = Image.fromarray(np.zeros((8, 8, 4), np.uint8), mode="RGBA")  # transparent -> white
  rgba.save(tmp_path / "clear.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  out = images_lib.load_image(str(tmp_path / "gray.png"), 16)
  assert out.shape == (16, 16, 3) and np.allclose(out, 1.0)
  assert np.allclose(images_lib.load_image(str(tmp_path / "clear.png"), 8), 1.0)
  with pytest.raises(images_lib.BadImageError, match="broken.png"):
    images_lib.load_image(str(tmp_path / "broken.png"), 8)
  with pytest.raises(images_lib.BadImageError, match="digits\\[3\\].*dtype int64"):
    images_lib.array_to_model_input(np.zeros((8, 8), np.int64), 8, source="digits[3]")
  with pytest.raises(images_lib.BadImageError, match="img.*\\[0, 1\\]"):
    images_lib.array_to_model_input(np.full((8, 8), 3.0), 8, source="img")
  with pytest.raises(images_lib.BadImageError, match="shape"):
    images_lib.array_to_model_input(np.zeros((8, 8, 2), np.uint8), 8)
  os.makedirs(tmp_path / "empty_dir")
  with pytest.raises(FileNotFoundError, match="empty_dir.*no images"):
    images_lib.list_images(str(tmp_path / "empty_dir"))
  with pytest.raises(ValueError, match="not divisible"):
    vae_lib.init_vae(SMALL).encode(np.zeros((1, 9, 9, 3), np.float32))


def test_training_lowers_the_loss_resumes_and_writes_stats(tmp_path):
  from sklearn.datasets import load_digits
  digits = load_digits().images[:200] / 16.0
  images = np.stack([images_lib.array_to_model_input(d, 8) for d in digits])
  logs = []
  vae, report = train_lib.train_vae(images, SMALL, steps=80, batch_size=16, lr=3e-3,
                                    workdir=str(tmp_path / "run"), log_every=10, log=logs.append)
  history = report["history"]
  assert history[-1]["l1"] < 0.75 * history[0]["l1"]
  # Better than the best constant guess (the mean training image).
  baseline = train_lib.psnr(images, np.broadcast_to(images.mean(0), images.shape))
  assert report["heldout_psnr"] > baseline + 2
  assert np.ndim(vae.scale) == 1  # per-channel stats from the training images
  # A rerun resumes from the checkpoint instead of starting over.
  _, again = train_lib.train_vae(images, SMALL, steps=80, batch_size=16, lr=3e-3,
                                 workdir=str(tmp_path / "run"), log=logs.append)
  assert any("resumed at step 80" in line for line in logs) and again["history"] == []
  vae_lib.save_vae(vae, str(tmp_path / "vae"))
  path, mean, std = stats_lib.write_stats(str(tmp_path / "vae"), images[:50])
  with open(path) as f:
    assert len(json.load(f)["mean"]) == 4
  z = vae_lib.load_vae(str(tmp_path / "vae")).encode(images[:50])
  np.testing.assert_allclose(np.asarray(z).reshape(-1, 4).mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(np.asarray(z).reshape(-1, 4).std(0), 1.0, atol=1e-3)
