"""`tfusion-generate` end to end on a tiny checkpoint, tokenizer and VAE made here."""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tfusion import checkpoint, configlib, train_state
from tfusion import vae as vae_lib
from tfusion.data import tokenizer as tokenizer_lib
from tfusion.generate import cli

TEXT = ["a red bird on a branch", "two green apples", "the number seven", "a small blue car",
        "a photo of a cat", "an old brown dog"] * 20


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with a checkpoint of a tiny random model; returns (workdir, tokenizer, vae)."""
  root = tmp_path_factory.mktemp("generate_cli")
  text = root / "text.txt"
  text.write_text("\n".join(TEXT))
  tok = tokenizer_lib.train_tokenizer([str(text)], 300, str(root / "tok"))
  vae_dir = str(root / "vae")
  vae_lib.save_vae(vae_lib.init_vae(vae_lib.VAEConfig(
      block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8)),
      vae_dir)
  config = configlib.base_config()
  config.model.update(vocab_size=320, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, mlp_dim=64, max_len=64)
  config.model.image.update(latent_size=4, latent_channels=4, patch_size=2)
  config.data.tokenizer = str(root / "tok.model")
  model = train_state.build_model(config)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *train_state.dummy_inputs(config.model)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.1, shapes)
  ckpt = checkpoint.Checkpointer(str(root / "run"), async_save=False)
  ckpt.save(3, {"params": params, "step": np.int32(3)}, {}, config.to_json())
  ckpt.close()
  return str(root / "run"), tok, vae_dir


def _run(argv, capsys):
  wrote = cli.run(cli.parse_args(argv))
  return wrote, capsys.readouterr().out


def test_text_to_image_writes_a_labelled_grid_and_pngs(workdir, tmp_path, capsys):
  run_dir, _, vae_dir = workdir
  out = str(tmp_path / "grid.png")
  args = ["--workdir", run_dir, "--prompt", "a red bird", "--prompt", "two green apples",
          "--num", "2", "--steps", "3", "--cfg", "3", "--seed", "1", "--vae", vae_dir,
          "--out", out, "--images_dir", str(tmp_path / "images"),
          "--latents", str(tmp_path / "latents.npy"), "--fast_compile"]
  wrote, printed = _run(args, capsys)
  assert "step 3" in printed and "4 images (2 prompts x 2)" in printed
  grid = Image.open(out)
  assert grid.size[0] >= 2 * 8 and grid.size[1] > 2 * 8
  pngs = sorted(os.listdir(tmp_path / "images"))
  assert pngs == ["0000_00.png", "0001_00.png", "0002_00.png", "0003_00.png"]
  assert np.asarray(Image.open(tmp_path / "images" / pngs[0])).shape == (8, 8, 3)
  latents = np.load(tmp_path / "latents.npy")
  assert latents.shape == (4, 4, 4, 4) and np.isfinite(latents).all()


def test_captioning_prints_and_writes_captions(workdir, tmp_path, capsys):
  run_dir, _, vae_dir = workdir
  image = tmp_path / "bird.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 16, 3), np.uint8)).save(image)
  out = str(tmp_path / "captions.jsonl")
  wrote, printed = _run(["--workdir", run_dir, "--caption", str(image), str(image), "--vae",
                         vae_dir, "--max_new_tokens", "5", "--out", out, "--fast_compile"],
                        capsys)
  records = [json.loads(line) for line in open(out)]
  assert [r["image"] for r in records] == [str(image)] * 2
  assert records[0]["caption"] == records[1]["caption"]
  assert f"{image}: " in printed


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "euler"], "sampler 'euler' is for the 'flow' objective"),
    (["--sampler", "k_lms"], "unknown sampler 'k_lms'"),
    (["--prompt", "word " * 80], "needs .* positions but the model's context is "
                                 "config.model.max_len=64"),
    (["--vae", "/nonexistent/vae"], "VAE file /nonexistent/.*does not exist"),
    (["--tokenizer", "/nonexistent/tok.model"], "tokenizer file '/nonexistent/tok.model'"),
])
def test_bad_requests_fail_with_a_clear_message(workdir, tmp_path, capsys, flags, message):
  run_dir, _, vae_dir = workdir
  argv = ["--workdir", run_dir, "--prompt", "a bird", "--vae", vae_dir, "--out",
          str(tmp_path / "x.png")] + flags
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert re.search(message, capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "x.png")


def test_missing_checkpoint_and_usage_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--workdir", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "x.png")])
  assert e.value.code == 2 and "no complete checkpoint" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--workdir", str(tmp_path), "--prompt", "x"])  # no output named
  assert "say where the images go" in capsys.readouterr().err


@pytest.fixture(scope="module")
def discrete_workdir(workdir, tmp_path_factory):
  """A discrete (Chameleon-baseline) checkpoint beside a 16-code VQ-VAE (4x down: 16x16 images
  are 4x4 codes). Returns (workdir, vq_dir, config, params)."""
  from tfusion.vae import vq as vq_lib
  from tfusion.vae.model import VAEConfig
  root = tmp_path_factory.mktemp("generate_cli_discrete")
  run_dir, _, _ = workdir
  cfg = VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, mid_block_add_attention=False)
  rng = np.random.default_rng(1)
  vq_params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32) * 0.1,
                           vq_lib.abstract_params(cfg, 3))
  # A codebook of encoder vectors of random images, so that images get varied codes.
  images = rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
  z = np.asarray(vq_lib.VQAutoencoder(cfg, 3).apply(
      {"params": vq_params}, images, method=vq_lib.VQAutoencoder.encode)).reshape(-1, 3)
  vq_dir = str(root / "vq")
  vq_lib.save_vq(vq_lib.VQVAE(cfg, vq_params, z[rng.choice(len(z), 16, replace=False)]), vq_dir)
  config = configlib.base_config()
  config.model.update(vocab_size=320, d_model=32, num_layers=2, num_heads=2, num_kv_heads=2,
                      head_dim=16, mlp_dim=64, max_len=80)
  config.model.image.update(representation="discrete", codebook_size=16, latent_size=4,
                            patch_size=1)
  config.data.tokenizer = os.path.join(os.path.dirname(run_dir), "tok.model")  # the text run's
  config.vae.path = vq_dir
  model = train_state.build_model(config)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *train_state.dummy_inputs(config.model)))
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.3, shapes)
  ckpt = checkpoint.Checkpointer(str(root / "run"), async_save=False)
  ckpt.save(2, {"params": params, "step": np.int32(2)}, {}, config.to_json())
  ckpt.close()
  return str(root / "run"), vq_dir, config, params


def test_discrete_model_draws_codes_the_vq_vae_decodes(discrete_workdir, tmp_path, capsys):
  """text -> codes with the image flags -> PNGs decoded by the VQ-VAE; interleaved documents;
  captions of images encoded to codes."""
  from tfusion.generate import engine
  from tfusion.vae import images as images_lib, vq as vq_lib
  run_dir, vq_dir, config, params = discrete_workdir
  prompts = ["a red bird", "two green apples"]
  args = ["--workdir", run_dir, "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "4",
          "--cfg", "2", "--image_temperature", "0.7", "--image_top_k", "5",
          "--images_dir", str(tmp_path / "images"), "--latents", str(tmp_path / "codes.npy"),
          "--fast_compile"]
  wrote, printed = _run(args, capsys)
  assert "discrete images" in printed and "sampler autoregressive 16 steps" in printed
  codes = np.load(tmp_path / "codes.npy")
  assert codes.shape == (2, 4, 4) and codes.dtype == np.int32
  tok = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  gen = engine.Generator(config, params, engine.SpecialTokens.from_tokenizer(tok))
  want = gen.text_to_image([tok.encode(p) for p in prompts], engine.sample_keys(4, 2),
                           guidance_scale=2.0, image_temperature=0.7, image_top_k=5)
  np.testing.assert_array_equal(codes, want)  # the flags reach the sampler
  vq = vq_lib.load_vq(vq_dir)  # the reference: the VQ-VAE itself, not the CLI's codec
  png = np.asarray(Image.open(tmp_path / "images" / "0001_00.png"))
  np.testing.assert_array_equal(png, images_lib.to_uint8(np.asarray(vq.decode_codes(codes)))[1])

  wrote, printed = _run(["--workdir", run_dir, "--prompt", prompts[0], "--interleaved",
                         "--num_images", "2", "--max_new_tokens", "3", "--out",
                         str(tmp_path / "doc.png"), "--fast_compile"], capsys)
  assert printed.count("[image") == 2 and os.path.exists(tmp_path / "doc.png")

  image = tmp_path / "noise.png"
  png = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
  Image.fromarray(png).save(image)
  wrote, printed = _run(["--workdir", run_dir, "--caption", str(image), "--max_new_tokens", "4",
                         "--fast_compile"], capsys)
  pixels = np.asarray(png, np.float32)[None] / 127.5 - 1.0
  codes = np.asarray(vq.encode_codes(pixels))
  assert len(np.unique(codes)) > 4  # varied codes: a caption that read them wrongly differs
  want = gen.caption(codes, engine.sample_keys(0, 1), max_new_tokens=4)
  assert wrote["captions"][0]["caption"] == tok.decode(want[0])

  with pytest.raises(SystemExit) as e:
    cli.main(args[:4] + ["--image_top_k", "17", "--latents", str(tmp_path / "x.npy")])
  assert e.value.code == 2 and "config.model.image.codebook_size" in capsys.readouterr().err
