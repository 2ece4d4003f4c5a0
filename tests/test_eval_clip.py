"""Flax CLIP vs open_clip (random weights through the converter), the CLIP score end to end
(preprocessing + tokenizer + towers), and converter/loader errors."""

import json

import jax
import numpy as np
import pytest

from tfusion.evaluate import clip, convert_clip

# Multi-head (16-wide heads), non-square inputs aside everything small. The full CLIP vocabulary
# and context so the real tokenizer can drive the end-to-end score.
TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 3,
                     "layers": 2}}
# GELU and mean pooling over patches; tiny vocabulary and context.
TINY_AVG = {"embed_dim": 16, "quick_gelu": False,
            "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "head_width": 16,
                           "patch_size": 6, "pool_type": "avg", "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 12, "vocab_size": 50, "width": 32, "heads": 2,
                         "layers": 1}}


def _open_clip_model(name, cfg, folder):
  """open_clip model for `cfg` (registered under `name`), every tensor randomized."""
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  (folder / f"{name}.json").write_text(json.dumps(cfg))
  open_clip.add_model_config(str(folder / f"{name}.json"))
  model = open_clip.create_model(name, pretrained=None).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():  # norms off identity, biases off zero: every mapping is exercised
    for key, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        p.copy_(noise * p.shape[-1] ** -0.5)
      else:
        p.copy_(noise * 0.2 + (1.0 if ".ln_" in f".{key}" and key.endswith("weight") else 0.0))
  return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (open_clip model, converted .npz path, open_clip config path)."""
  torch = pytest.importorskip("torch")
  folder = tmp_path_factory.mktemp("clip")
  out = {}
  for name, cfg in (("tfusion-test-tiny", TINY), ("tfusion-test-tiny-avg", TINY_AVG)):
    model = _open_clip_model(name, cfg, folder)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    npz = str(folder / f"{name}.npz")
    convert_clip.main(["--input", str(folder / f"{name}.pt"), "--output", npz,
                       "--open-clip-config", str(folder / f"{name}.json")])
    out[name] = (model, npz, str(folder / f"{name}.json"))
  return out


@pytest.mark.crosscheck
@pytest.mark.parametrize("name", ["tfusion-test-tiny", "tfusion-test-tiny-avg"])
def test_towers_match_open_clip(converted, name):
  import torch
  model, npz, _ = converted[name]
  config, params = clip.load_weights(npz)
  cfg = TINY if name == "tfusion-test-tiny" else TINY_AVG
  assert config.quick_gelu == cfg["quick_gelu"]
  rng = np.random.default_rng(0)
  size = config.image_size
  images = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  # Rows of different lengths; the end token is the highest id, zeros after it.
  tokens = rng.integers(1, config.vocab_size - 1, (3, config.context_length)).astype(np.int32)
  for row, end in enumerate([3, config.context_length - 1, 7]):
    tokens[row, end], tokens[row, end + 1:] = config.vocab_size - 1, 0
  with torch.no_grad():
    ref_image = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ref_text = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  net = clip.CLIP(config)
  image = jax.jit(lambda p, x: net.apply({"params": p}, x, method=clip.CLIP.encode_image))
  text = jax.jit(lambda p, t: net.apply({"params": p}, t, method=clip.CLIP.encode_text))
  d_image = np.abs(np.asarray(image(params, images)) - ref_image).max()
  d_text = np.abs(np.asarray(text(params, tokens)) - ref_text).max()
  print(f"\nCLIP {name} vs open_clip: image max abs diff {d_image:.3g} (max |feature| "
        f"{np.abs(ref_image).max():.3g}), text {d_text:.3g} ({np.abs(ref_text).max():.3g})")
  assert d_image < 2e-5 * max(1.0, np.abs(ref_image).max())
  assert d_text < 2e-5 * max(1.0, np.abs(ref_text).max())
  assert float(params["logit_scale"]) == pytest.approx(float(model.logit_scale.detach()), rel=1e-6)


@pytest.mark.crosscheck
def test_clip_score_end_to_end_matches_open_clip(converted):
  import open_clip
  import torch
  from PIL import Image
  model, npz, _ = converted["tfusion-test-tiny"]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 40, 52, 3), dtype=np.uint8)  # resized + cropped to 32
  captions = ["a photo of a dog", "Two cats, sleeping on a sofa!", "naïve café at night",
              "a red bus", "A bowl of fruit.", "people walking in the rain", "a small boat"]
  transform = open_clip.image_transform(32, is_train=False)
  tokenizer = open_clip.get_tokenizer("tfusion-test-tiny")
  with torch.no_grad():
    pixels = torch.stack([transform(Image.fromarray(im)) for im in images])
    a = model.encode_image(pixels, normalize=True)
    b = model.encode_text(tokenizer(captions), normalize=True)
  ref = (100.0 * torch.clamp((a * b).sum(-1), min=0)).numpy()
  np.testing.assert_allclose(clip.preprocess(images, 32), pixels.permute(0, 2, 3, 1).numpy(),
                             atol=1e-6)
  scorer = clip.CLIPScorer(npz, batch_size=4)  # 7 pairs: one full and one padded batch
  per_pair = scorer.per_pair(images, captions)
  print(f"\nCLIP score per pair {np.round(per_pair, 4)} vs open_clip {np.round(ref, 4)}")
  assert (ref > 1).sum() >= 2 and (ref == 0).sum() >= 1  # both sides of the clipping occur
  np.testing.assert_allclose(per_pair, ref, atol=1e-3)
  assert scorer(images, captions) == pytest.approx(float(ref.mean()), abs=1e-3)


@pytest.mark.crosscheck
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script/save are deprecated
def test_safetensors_torchscript_and_torch_files_convert_alike(converted, tmp_path):
  import torch
  safetensors_torch = pytest.importorskip("safetensors.torch")
  model, npz, cfg_path = converted["tfusion-test-tiny-avg"]
  st, scripted = str(tmp_path / "m.safetensors"), str(tmp_path / "scripted.pt")
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
  torch.jit.save(torch.jit.script(model), scripted)  # the format of OpenAI's released .pt files
  reference = np.load(npz)
  for source in (st, scripted):
    out = str(tmp_path / "out.npz")
    convert_clip.convert(source, out, open_clip_config=cfg_path)
    converted_again = np.load(out)
    assert sorted(converted_again.files) == sorted(reference.files)
    assert all(np.array_equal(converted_again[k], reference[k]) for k in reference.files)


def test_clip_score_is_100_times_clipped_cosine():
  image = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
  text = np.array([[2.0, 0.0], [4.0, -3.0], [-1.0, -1.0]])  # cos 1, 0, -1
  np.testing.assert_allclose(clip.clip_score_per_pair(image, text), [100.0, 0.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(clip.clip_score_per_pair(image[1:2], np.array([[3.0, 1.0]])),
                             [100.0 * 13 / (5 * np.sqrt(10))], rtol=1e-5)


def test_missing_or_bad_weight_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz.*tfusion-convert-clip"):
    clip.load_weights(str(tmp_path / "nope.npz"))
  config = clip.CLIPConfig(embed_dim=8, image_size=8, patch_size=4, vision_width=16,
                           vision_layers=1, vision_heads=2, context_length=5, vocab_size=11,
                           text_width=16, text_layers=1, text_heads=2)
  params = clip.random_params(config)
  good = str(tmp_path / "good.npz")
  clip.save_weights(good, config, params)
  loaded_config, loaded = clip.load_weights(good)
  assert loaded_config == config
  np.testing.assert_array_equal(loaded["visual"]["proj"], params["visual"]["proj"])
  with np.load(good) as data:
    flat = {k: data[k] for k in data.files}
  flat["params/visual/proj"] = np.zeros((16, 9), np.float32)
  del flat["params/text/ln_final/scale"]
  np.savez(str(tmp_path / "bad.npz"), **flat)
  with pytest.raises(ValueError, match=r"bad.npz.*missing text/ln_final/scale.*visual/proj"):
    clip.load_weights(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError, match="none.pt"):
    convert_clip.convert(str(tmp_path / "none.pt"), str(tmp_path / "out.npz"))


def test_unsupported_open_clip_configs_are_refused(tmp_path):
  cfg = json.loads(json.dumps(TINY))
  cfg["vision_cfg"]["ls_init_value"] = 1e-5
  cfg["text_cfg"]["no_causal_mask"] = True
  path = tmp_path / "layer-scale.json"
  path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"layer-scale.json.*ls_init_value.*no_causal_mask"):
    convert_clip.read_open_clip_config(str(path))
  resnet = {"embed_dim": 8, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8},
            "text_cfg": {"width": 8}}
  (tmp_path / "rn.json").write_text(json.dumps(resnet))
  with pytest.raises(ValueError, match="ResNet"):
    convert_clip.read_open_clip_config(str(tmp_path / "rn.json"))
  with pytest.raises(FileNotFoundError, match="No-Such-Model"):
    convert_clip.read_open_clip_config("No-Such-Model")


_TORCH_NAMES = (("resblocks_", "resblocks."), ("attn.in_proj.kernel", "attn.in_proj_weight"),
                ("attn.in_proj.bias", "attn.in_proj_bias"), (".scale", ".weight"),
                (".kernel", ".weight"), ("token_embedding.embedding", "token_embedding.weight"))


def test_config_inferred_from_shapes_like_openai():
  # An OpenAI-style state dict (64-wide heads): every size comes from the tensors.
  config = clip.CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=128,
                           vision_layers=2, vision_heads=2, context_length=7, vocab_size=30,
                           text_width=64, text_layers=3, text_heads=1, quick_gelu=True)
  shapes = clip.param_shapes(config)
  state = {}
  for path, shape in shapes.items():  # invert the documented mapping, by hand
    key = path.replace("text/", "").replace("visual/", "visual.").replace("/", ".")
    for ours, theirs in _TORCH_NAMES:
      key = key.replace(ours, theirs)
    if key.endswith("conv1.weight"):
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif key.endswith("weight") and len(shape) == 2 and "token_embedding" not in key:
      shape = shape[::-1]
    state[key] = np.zeros(shape, np.float32)
  inferred = convert_clip.infer_config(state, quick_gelu=True)
  assert inferred == config
  flat = convert_clip.state_dict_to_params(state, inferred)
  assert {k: v.shape for k, v in flat.items()} == shapes
  state["visual.transformer.resblocks.0.ls_1.gamma"] = np.zeros(128, np.float32)
  with pytest.raises(ValueError, match="ckpt.*not part of tfusion's CLIP.*ls_1.gamma"):
    convert_clip.state_dict_to_params(state, inferred, source="ckpt")
