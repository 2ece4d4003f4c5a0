"""tfusion-train-vae as a user meets it: --help shows defaults and the latent shape, logs start
at step 1, a bad image is skipped and named, and a rerun into an --out holding another
architecture stops in one line with nothing changed."""

import os

import numpy as np
import pytest
from PIL import Image

from tfusion.vae import train as vae_train

TINY = ["--resolution", "16", "--block_out_channels", "8,8", "--layers_per_block", "1",
        "--latent_channels", "4", "--norm_num_groups", "4", "--batch_size", "2"]


def test_help_shows_defaults_and_the_latent_shape(capsys):
  with pytest.raises(SystemExit) as e:
    vae_train.main(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "(default: 20000)" in text and "(default: 64,128,256,256)" in text
  assert "256px images -> 32x32x8 latents (8x downsampling" in text


@pytest.fixture
def folder(tmp_path):
  d = tmp_path / "images"
  d.mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
  (d / "zz_broken.png").write_bytes(b"not an image")
  return d


def test_bad_image_skipped_first_steps_logged_and_other_shapes_refused(folder, tmp_path,
                                                                        capsys):
  out = tmp_path / "vae"
  vae_train.main(["--images", str(folder), "--out", str(out), "--steps", "3", "--log_every",
                  "2", *TINY])
  lines = capsys.readouterr().out.splitlines()
  assert "vae: skipped 1 unreadable image: zz_broken.png" in lines
  assert any(line.startswith("vae: 5 images from") and "8x8x4 latents" in line
             for line in lines)
  steps = [line.split()[2] for line in lines if line.startswith("vae step ")]
  assert steps == ["1/3", "2/3", "3/3"]
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}

  with pytest.raises(SystemExit) as e:
    vae_train.main(["--images", str(folder), "--out", str(out), "--steps", "3",
                    *TINY, "--latent_channels", "8"])  # the last --latent_channels counts
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "latent_channels=4" in err[0] and "latent_channels=8" in err[0], err
  assert "block_out_channels" not in err[0]  # only what differs
  assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == before

  # A workdir from before vae_train.json (and with no saved VAE): the failing restore of
  # another architecture is one line too.
  os.remove(out / vae_train.TRAIN_FILE)
  os.remove(out / "config.json")
  images, _, bad = vae_train.load_images(str(folder), 16, log=lambda s: None)
  assert len(images) == 5 and [os.path.basename(b) for b in bad] == ["zz_broken.png"]
  wide = vae_train.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)
  with pytest.raises(vae_train.ShapeMismatchError, match="does not restore into this VAE"):
    vae_train.train_vae(images, wide, steps=4, batch_size=2, workdir=str(out),
                        log=lambda s: None)
