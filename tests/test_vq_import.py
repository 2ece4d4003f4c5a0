"""Importing public VQ-VAE weights (tfusion/vae/vq_import.py): diffusers VQModel directories,
taming-transformers VQGAN and LlamaGen checkpoints -> the project's VQ-VAE directory.

References: diffusers' VQModel in torch for its own directories; for taming and LlamaGen (no
reference library installed) a functional torch forward written from their published
architectures, reading the tensors by their source names, plus a parameter-level check of
renamed blocks. Small random models: each test takes seconds.
"""

import json
import os
import re
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tfusion.vae import quantizer, vq as vq_lib, vq_import
from tfusion.vae.model import VAEConfig
from tfusion.vae.weights import WeightMismatchError
from test_vae_formats import _to_ldm  # diffusers -> taming/LDM names, checked against diffusers

GROUPS = 4
CHANNELS = (8, 16, 32)
LEVELS = len(CHANNELS)


def _diffusers_vq(seed=0, channels=CHANNELS, attn_levels=(), **kwargs):
  """A random diffusers VQModel; attn_levels: resolution levels (0 = full size) whose encoder
  and decoder blocks attend after each resnet (Attn{Down,Up}*Block2D)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  n = len(channels)
  ref = diffusers.VQModel(
      in_channels=3, out_channels=3,
      down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn_levels else
                             "DownEncoderBlock2D" for i in range(n)),
      up_block_types=tuple("AttnUpDecoderBlock2D" if n - 1 - i in attn_levels else
                           "UpDecoderBlock2D" for i in range(n)),  # up_blocks: deepest first
      block_out_channels=channels, layers_per_block=1, latent_channels=4, num_vq_embeddings=24,
      vq_embed_dim=3, norm_num_groups=GROUPS, sample_size=16, **kwargs)
  with torch.no_grad():  # move every tensor (norms included) off its default init
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return ref.eval()


def _saved(ref, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vqmodel"))
  ref.save_pretrained(path, safe_serialization=True)
  return path, ref, load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
  """A random diffusers VQModel saved with save_pretrained: (directory, model, state dict)."""
  return _saved(_diffusers_vq(), tmp_path_factory)


@pytest.fixture(scope="module")
def diffusers_attn_dir(tmp_path_factory):
  """The same with attention in the deepest level, as released taming/LlamaGen VQs have."""
  return _saved(_diffusers_vq(5, attn_levels=(LEVELS - 1,)), tmp_path_factory)


def _images(n=2, size=16, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


_SOURCE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                     "to_out.0": "proj_out"}
_LEVEL_ATTENTION = re.compile(r"^(encoder\.down|decoder\.up)_blocks\.(\d+)\.attentions\.(\d+)\."
                              r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")


def _to_taming(state, num_levels):
  """diffusers names -> taming names: level attention `down.{i}.attn.{j}`, `up.{level}.attn.{j}`
  (decoder counted by resolution level, 0 = full size) as 1x1 convs; the rest by _to_ldm."""
  out, rest = {}, {}
  for key, value in state.items():
    m = _LEVEL_ATTENTION.match(key)
    if not m:
      rest[key] = value
      continue
    level = int(m[2]) if m[1] == "encoder.down" else num_levels - 1 - int(m[2])
    out[f"{m[1]}.{level}.attn.{m[3]}.{_SOURCE_ATTENTION[m[4]]}.{m[5]}"] = \
        value[:, :, None, None] if value.ndim == 2 else value
  return {**_to_ldm(rest, num_levels), **out}


def _to_llamagen(state, num_levels):
  """diffusers names -> LlamaGen vq_model.py names (decoder levels stay deepest first)."""
  out = {}
  for key, value in state.items():
    m = _LEVEL_ATTENTION.match(key)
    if m:  # conv_blocks.{i}.attn.{j}: encoder i by resolution, decoder i deepest first
      side = m[1].split(".")[0]
      out[f"{side}.conv_blocks.{m[2]}.attn.{m[3]}.{_SOURCE_ATTENTION[m[4]]}.{m[5]}"] = \
          value[:, :, None, None] if value.ndim == 2 else value
      continue
    k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.conv_blocks.\1"
               r".downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.conv_blocks.\1.res.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.conv_blocks.\1.upsample.",
               k)
    k = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.{2 * int(m[1])}.", k)
    m = re.match(r"^(.*)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                 r"(weight|bias)$", key)
    if m:
      name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
              "to_out.0": "proj_out"}[m[2]]
      k = f"{m[1]}.mid.1.{name}.{m[3]}"
      value = value[:, :, None, None] if value.ndim == 2 else value
    out[k] = value
  del num_levels
  return out


# --------------------------------------- a functional reference of the source architectures


def _names(layout, n):
  """Source tensor prefixes: encoder resnet (i, j), downsample i, mid part 0..2, decoder resnet
  (resolution level, j), upsample level."""
  if layout == "taming":
    mid = {0: "mid.block_1", 1: "mid.attn_1", 2: "mid.block_2"}
    return dict(enc=lambda i, j: f"encoder.down.{i}.block.{j}",
                enc_attn=lambda i, j: f"encoder.down.{i}.attn.{j}",
                down=lambda i: f"encoder.down.{i}.downsample.conv", mid=mid.__getitem__,
                dec=lambda lv, j: f"decoder.up.{lv}.block.{j}",
                dec_attn=lambda lv, j: f"decoder.up.{lv}.attn.{j}",
                up=lambda lv: f"decoder.up.{lv}.upsample.conv")
  return dict(enc=lambda i, j: f"encoder.conv_blocks.{i}.res.{j}",
              enc_attn=lambda i, j: f"encoder.conv_blocks.{i}.attn.{j}",
              down=lambda i: f"encoder.conv_blocks.{i}.downsample.conv",
              mid=lambda idx: f"mid.{idx}",
              dec=lambda lv, j: f"decoder.conv_blocks.{n - 1 - lv}.res.{j}",
              dec_attn=lambda lv, j: f"decoder.conv_blocks.{n - 1 - lv}.attn.{j}",
              up=lambda lv: f"decoder.conv_blocks.{n - 1 - lv}.upsample.conv")


def _reference(state, images, layout, *, layers=1, l2_norm=False):
  """taming/LlamaGen VQ forward from source-named tensors: images NHWC -> (codes, decoded).

  A level whose attn list is non-empty (attn_resolutions; LlamaGen's deepest) applies attn[j]
  right after block/res[j], in the encoder and the decoder."""
  import torch
  import torch.nn.functional as F
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
  names = _names(layout, LEVELS)

  def norm(h, p):
    return F.group_norm(h, GROUPS, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)

  def conv(h, p, **kw):
    w = sd[f"{p}.weight"]
    return F.conv2d(h, w, sd[f"{p}.bias"], padding=kw.pop("padding", w.shape[-1] // 2), **kw)

  def res(h, p):
    y = conv(F.silu(norm(h, f"{p}.norm1")), f"{p}.conv1")
    y = conv(F.silu(norm(y, f"{p}.norm2")), f"{p}.conv2")
    return (conv(h, f"{p}.nin_shortcut") if f"{p}.nin_shortcut.weight" in sd else h) + y

  def attn(h, p):
    y = norm(h, f"{p}.norm")
    q, k, v = (conv(y, f"{p}.{c}").flatten(2) for c in "qkv")  # [b, c, hw]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * q.shape[1] ** -0.5, -1)
    return h + conv(torch.einsum("bij,bcj->bci", w, v).reshape(h.shape), f"{p}.proj_out")

  def mid(h, side):
    h = res(h, f"{side}.{names['mid'](0)}")
    return res(attn(h, f"{side}.{names['mid'](1)}"), f"{side}.{names['mid'](2)}")

  def tail(h, side):
    return conv(F.silu(norm(h, f"{side}.norm_out")), f"{side}.conv_out")

  with torch.no_grad():
    h = conv(torch.from_numpy(images).permute(0, 3, 1, 2), "encoder.conv_in")
    for i in range(LEVELS):
      attends = f"{names['enc_attn'](i, 0)}.q.weight" in sd
      for j in range(layers):
        h = res(h, names["enc"](i, j))
        if attends:
          h = attn(h, names["enc_attn"](i, j))
      if i + 1 < LEVELS:  # pad right/bottom, stride 2
        h = conv(F.pad(h, (0, 1, 0, 1)), names["down"](i), stride=2, padding=0)
    z = conv(tail(mid(h, "encoder"), "encoder"), "quant_conv").permute(0, 2, 3, 1)
    codebook = sd["quantize.embedding.weight"]
    if l2_norm:
      z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    codes = torch.argmin(torch.cdist(z.reshape(-1, z.shape[-1]), codebook), -1)
    codes = codes.reshape(z.shape[:-1])
    h = conv(codebook[codes].permute(0, 3, 1, 2), "post_quant_conv")
    h = mid(conv(h, "decoder.conv_in"), "decoder")
    for level in reversed(range(LEVELS)):
      attends = f"{names['dec_attn'](level, 0)}.q.weight" in sd
      for j in range(layers + 1):
        h = res(h, names["dec"](level, j))
        if attends:
          h = attn(h, names["dec_attn"](level, j))
      if level > 0:
        h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), names["up"](level))
    return codes.numpy(), tail(h, "decoder").permute(0, 2, 3, 1).numpy()


def _check_matches(vq, ref_codes, ref_images, images):
  codes = np.asarray(vq.encode_codes(images))
  np.testing.assert_array_equal(codes, ref_codes)
  # float32 on both sides, same ops up to reassociation: measured max abs diff 2.4e-6.
  np.testing.assert_allclose(np.asarray(vq.decode_codes(codes)), ref_images, atol=5e-5)


def _same_params(a, b):
  import jax
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ------------------------------------------------------------------------------- diffusers


@pytest.mark.crosscheck
@pytest.mark.parametrize("fixture", ["diffusers_dir", "diffusers_attn_dir"])
def test_diffusers_vqmodel_loads_directly_and_imports(fixture, request, tmp_path):
  import torch
  path, ref, _ = request.getfixturevalue(fixture)
  x = _images()
  with torch.no_grad():
    h = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latents
    ref_codes = ref.quantize(h)[2][2].reshape(2, 4, 4).numpy()
    ref_images = ref.decode(h).sample.permute(0, 2, 3, 1).numpy()
  assert len(np.unique(ref_codes)) > 3  # a test of the lookup, not of one code
  direct = vq_lib.load_vq(path)  # the diffusers directory as it is
  attends = fixture == "diffusers_attn_dir"
  assert direct.config.down_attention == (False, False, attends)
  assert direct.config.up_attention == (attends, False, False)
  _check_matches(direct, ref_codes, ref_images, x)
  imported = vq_import.import_vq(path, str(tmp_path / "out"))
  _same_params(imported.params, direct.params)
  again = vq_lib.load_vq(str(tmp_path / "out"))
  assert again.config == direct.config
  _check_matches(again, ref_codes, ref_images, x)


def test_diffusers_directory_refusals(diffusers_dir, tmp_path):
  path, _, state = diffusers_dir
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)

  def write(name, state=state, **updates):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**config, **updates}))
    save_file(state, str(d / "diffusion_pytorch_model.safetensors"))
    return str(d)

  with pytest.raises(WeightMismatchError, match=r"codebook \(24, 3\), config.json says \(99, 3\)"):
    vq_import.import_vq(write("codes", num_vq_embeddings=99), str(tmp_path / "o1"))
  with pytest.raises(ValueError, match="norm_type='spatial'"):  # MoVQ's decoder
    vq_import.import_vq(write("spatial", norm_type="spatial"), str(tmp_path / "o2"))
  with pytest.raises(ValueError, match=r"attn/config.json: down_block_types has "
                     r"\['SimpleDownEncoderBlock2D'\]; supported: \['DownEncoderBlock2D', "
                     r"'AttnDownEncoderBlock2D'\]"):
    vq_import.import_vq(write("attn", down_block_types=["DownEncoderBlock2D"] * 2 +
                              ["SimpleDownEncoderBlock2D"]), str(tmp_path / "o3"))
  with pytest.raises(WeightMismatchError, match=r"missing \(10\): encoder\.down_blocks\.2\."
                     r"attentions\.0\.group_norm\.bias"):  # the config attends, the weights not
    vq_import.import_vq(write("attn2", down_block_types=["DownEncoderBlock2D"] * 2 +
                              ["AttnDownEncoderBlock2D"]), str(tmp_path / "o3"))
  with pytest.raises(ValueError, match="pass the VQModel directory"):
    vq_import.import_vq(os.path.join(path, "diffusion_pytorch_model.safetensors"),
                        str(tmp_path / "o4"))
  assert not any(os.path.exists(tmp_path / f"o{i}") for i in range(1, 5))


# ---------------------------------------------------------------------------------- taming


@pytest.mark.crosscheck
def test_taming_vqgan_lightning_checkpoint(diffusers_dir, tmp_path):
  import torch
  path, _, state = diffusers_dir
  taming = _to_ldm(state, LEVELS)
  assert "decoder.up.2.block.0.conv1.weight" in taming and "encoder.mid.attn_1.q.weight" in taming
  ckpt = {k: torch.from_numpy(v) for k, v in taming.items()}
  ckpt["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)  # the GAN loss: ignored
  ckpt["loss.logvar"] = torch.zeros(())
  torch.save({"state_dict": ckpt, "global_step": 7, "epoch": 1}, str(tmp_path / "last.ckpt"))
  vq = vq_import.import_vq(str(tmp_path / "last.ckpt"), str(tmp_path / "out"),
                           norm_num_groups=GROUPS)
  loaded = vq_lib.load_vq(str(tmp_path / "out"))
  assert not loaded.codebook_l2_norm
  _same_params(vq.params, vq_lib.load_vq(path).params)  # consistent with the diffusers path
  # Renamed blocks, by hand: decoder.up.{i} is up_blocks.{n-1-i}; nin_shortcut; 1x1-conv q.
  p = loaded.params
  np.testing.assert_array_equal(p["decoder"]["up_blocks_0_resnets_1"]["conv1"]["kernel"],
                                taming["decoder.up.2.block.1.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["decoder"]["up_blocks_2_resnets_0"]["conv_shortcut"]["kernel"],
                                taming["decoder.up.0.block.0.nin_shortcut.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"],
                                taming["encoder.mid.attn_1.q.weight"][:, :, 0, 0].T)
  x = _images()
  _check_matches(loaded, *_reference(taming, x, "taming"), x)


@pytest.mark.crosscheck
def test_taming_vqgan_with_level_attention(diffusers_attn_dir, tmp_path):
  """attn_resolutions at the deepest level (every released taming VQGAN config) now imports."""
  import torch
  path, _, state = diffusers_attn_dir
  taming = _to_taming(state, LEVELS)
  # the deepest level (2) attends after each resnet: 1 in the encoder, 2 in the decoder
  assert {k.split(".attn.")[0] for k in taming if ".attn." in k} == {"encoder.down.2",
                                                                      "decoder.up.2"}
  assert "decoder.up.2.attn.1.proj_out.weight" in taming
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in taming.items()}},
             str(tmp_path / "vqgan.ckpt"))
  vq = vq_import.import_vq(str(tmp_path / "vqgan.ckpt"), str(tmp_path / "out"),
                           norm_num_groups=GROUPS)
  loaded = vq_lib.load_vq(str(tmp_path / "out"))
  assert loaded.config.down_attention == (False, False, True)
  assert loaded.config.up_attention == (True, False, False)
  _same_params(vq.params, vq_lib.load_vq(path).params)
  # By hand: decoder.up.2.attn.{j} (resolution level 2) is up_blocks.0.attentions.{j}.
  p = loaded.params["decoder"]
  for j in range(2):
    np.testing.assert_array_equal(p[f"up_blocks_0_attentions_{j}"]["to_k"]["kernel"],
                                  taming[f"decoder.up.2.attn.{j}.k.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(p[f"up_blocks_0_attentions_{j}"]["group_norm"]["scale"],
                                  taming[f"decoder.up.2.attn.{j}.norm.weight"])
  np.testing.assert_array_equal(
      loaded.params["encoder"]["down_blocks_2_attentions_0"]["to_out_0"]["kernel"],
      taming["encoder.down.2.attn.0.proj_out.weight"][:, :, 0, 0].T)
  x = _images(seed=2)
  ref_codes, ref_images = _reference(taming, x, "taming")
  plain = {k: v for k, v in taming.items() if ".attn." not in k or "mid" in k}
  assert np.abs(_reference(plain, x, "taming")[1] - ref_images).max() > 1e-2  # attention matters
  _check_matches(loaded, ref_codes, ref_images, x)


def test_taming_safetensors_without_torch(tmp_path, monkeypatch):
  """A .safetensors taming file converts with numpy alone; a .pt then asks for torch."""
  config = VAEConfig(block_out_channels=CHANNELS, layers_per_block=1, latent_channels=4,
                     norm_num_groups=GROUPS)
  from tfusion import vae as vae_lib
  params = vae_lib.host_init(vq_lib.abstract_params(config, 3), seed=2)
  codebook = np.random.default_rng(3).standard_normal((24, 3)).astype(np.float32)
  vq_lib.save_vq(vq_lib.VQVAE(config, params, codebook), str(tmp_path / "ours"))
  state = load_file(str(tmp_path / "ours" / vae_lib.WEIGHTS_FILE))
  save_file(_to_ldm(state, LEVELS), str(tmp_path / "vqgan.safetensors"))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails from here on
  vq_import.main([str(tmp_path / "vqgan.safetensors"), str(tmp_path / "out"),
                  "--norm-groups", str(GROUPS)])
  loaded = vq_lib.load_vq(str(tmp_path / "out"))
  _same_params(loaded.params, vq_lib.load_vq(str(tmp_path / "ours")).params)
  np.testing.assert_array_equal(loaded.codebook, codebook)
  (tmp_path / "vqgan.ckpt").write_bytes(b"not read")
  with pytest.raises(ImportError, match="vqgan.ckpt: .*install torch or convert the file to "
                                        r"\.safetensors"):
    vq_import.import_vq(str(tmp_path / "vqgan.ckpt"), str(tmp_path / "out2"))
  with pytest.raises(vq_import.UnsupportedLayoutError, match=r"channels \[8, 16\] are not "
                                                            "divisible by 32 GroupNorm groups"):
    vq_import.import_vq(str(tmp_path / "vqgan.safetensors"), str(tmp_path / "out3"))


class _NotATensor:
  pass


@pytest.mark.crosscheck
def test_taming_refusals(diffusers_dir, diffusers_attn_dir, tmp_path):
  import torch
  _, _, state = diffusers_dir
  taming = {k: torch.from_numpy(v) for k, v in _to_ldm(state, LEVELS).items()}

  def refused(name, ckpt, match):
    torch.save(ckpt, str(tmp_path / name))
    with pytest.raises((vq_import.UnsupportedLayoutError, ValueError), match=match):
      vq_import.import_vq(str(tmp_path / name), str(tmp_path / "out"), norm_num_groups=GROUPS)
    assert not os.path.exists(tmp_path / "out")

  # A decoder level attending after one of its two resnets: not a diffusers Attn*Block2D.
  partial = {k: torch.from_numpy(v) for k, v in _to_taming(diffusers_attn_dir[2], LEVELS).items()
             if ".up.2.attn.1." not in k}
  refused("attn.ckpt", {"state_dict": partial},
          r"attn\.ckpt: decoder\.up_blocks\.0 has attention blocks up to attentions\.0 for 2 "
          r"resnets; the layout needs one after every resnet of a level, or none")
  refused("temb.ckpt", {**taming, "encoder.temb.dense.0.weight": torch.zeros(4, 4)},
          r"temb\.ckpt: .*\n  unknown tensors \(1\): encoder\.temb\.dense\.0\.weight")
  shortcut = {k.replace("nin_shortcut", "conv_shortcut"): v for k, v in taming.items()}
  refused("shortcut.ckpt", shortcut, r"encoder\.down\.1\.block\.0\.conv_shortcut\.weight "
                                     r"\(3x3 conv_shortcut\)")
  pooled = {k: v for k, v in taming.items() if ".downsample." not in k}  # avg-pool downsampling
  refused("pooled.ckpt", pooled, r"missing \(4\): encoder\.down_blocks\.0\.downsamplers\.0")
  wide = {**taming, "quantize.embedding.weight": torch.zeros(24, 5)}  # codebook vs quant_conv
  refused("wide.ckpt", wide, r"wide\.ckpt: codebook quantize\.embedding\.weight \(24, 5\) holds "
          r"5-d codes; quant_conv\.weight \(3, 4, 1, 1\) makes 3-d vectors")
  refused("pickle.ckpt", {"state_dict": taming, "hparams": _NotATensor()},
          r"pickle\.ckpt: not loadable with torch\.load\(weights_only=True\)")


# -------------------------------------------------------------------------------- LlamaGen


def _llamagen_checkpoint(state, tmp_path, name="vq_ds8_c2i.pt", **extra):
  import torch
  llama = _to_llamagen(state, LEVELS)
  # LlamaGen learns raw entries and normalises them in use: give them very different norms.
  rng = np.random.default_rng(4)
  llama["quantize.embedding.weight"] = (llama["quantize.embedding.weight"] *
                                        rng.uniform(0.1, 5.0, (24, 1))).astype(np.float32)
  model = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in llama.items()}
  model["quantize.codebook_used"] = torch.zeros(65536)
  model.update(extra)
  torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "steps": 3},
             str(tmp_path / name))
  return str(tmp_path / name), llama


@pytest.mark.crosscheck
def test_llamagen_vq_with_l2_normalised_codebook(diffusers_dir, tmp_path):
  path, _, state = diffusers_dir
  ckpt, llama = _llamagen_checkpoint(state, tmp_path)
  assert "decoder.conv_blocks.0.res.1.conv2.weight" in llama and "encoder.mid.1.q.weight" in llama
  vq = vq_import.import_vq(ckpt, str(tmp_path / "out"), norm_num_groups=GROUPS)
  loaded = vq_lib.load_vq(str(tmp_path / "out"))
  assert loaded.codebook_l2_norm and vq.codebook_l2_norm
  with open(tmp_path / "out" / "config.json") as f:
    assert json.load(f)["codebook_l2_norm"] is True
  _same_params(loaded.params, vq_lib.load_vq(path).params)
  np.testing.assert_array_equal(  # conv_blocks.{k} is up_blocks.{k}: no reversal in LlamaGen
      loaded.params["decoder"]["up_blocks_0_resnets_1"]["conv2"]["kernel"],
      llama["decoder.conv_blocks.0.res.1.conv2.weight"].transpose(2, 3, 1, 0))
  x = _images(seed=1)
  ref_codes, ref_images = _reference(llama, x, "llamagen", l2_norm=True)
  plain_codes, _ = _reference(llama, x, "llamagen", l2_norm=False)
  assert (plain_codes != ref_codes).mean() > 0.2  # normalising matters for these entries
  _check_matches(loaded, ref_codes, ref_images, x)


@pytest.mark.crosscheck
def test_llamagen_vq_with_level_attention(diffusers_attn_dir, tmp_path):
  """LlamaGen's VQ as released: attention after each resnet of the deepest level (encoder
  conv_blocks.{n-1}.attn, decoder conv_blocks.0.attn)."""
  path, _, state = diffusers_attn_dir
  ckpt, llama = _llamagen_checkpoint(state, tmp_path)
  assert {k.split(".attn.")[0] for k in llama if ".attn." in k} == {
      "encoder.conv_blocks.2", "decoder.conv_blocks.0"}
  vq_import.import_vq(ckpt, str(tmp_path / "out"), norm_num_groups=GROUPS)
  loaded = vq_lib.load_vq(str(tmp_path / "out"))
  assert loaded.codebook_l2_norm
  assert loaded.config.up_attention == (True, False, False)
  _same_params(loaded.params, vq_lib.load_vq(path).params)
  np.testing.assert_array_equal(  # conv_blocks.0 is up_blocks.0: no reversal in LlamaGen
      loaded.params["decoder"]["up_blocks_0_attentions_1"]["to_q"]["kernel"],
      llama["decoder.conv_blocks.0.attn.1.q.weight"][:, :, 0, 0].T)
  x = _images(seed=3)
  _check_matches(loaded, *_reference(llama, x, "llamagen", l2_norm=True), x)


@pytest.mark.crosscheck
def test_llamagen_refusals(diffusers_dir, tmp_path):
  import torch
  _, _, state = diffusers_dir
  level_attn = {f"encoder.conv_blocks.2.attn.0.{p}.bias": torch.zeros(32)
                for p in ("norm", "q", "k", "v", "proj_out")}
  ckpt, _ = _llamagen_checkpoint(state, tmp_path, "attn.pt", **level_attn)
  with pytest.raises(WeightMismatchError, match=r"attn\.pt does not match .*\n  missing \(5\): "
                     r"encoder\.down_blocks\.2\.attentions\.0\.group_norm\.weight, "
                     r"encoder\.down_blocks\.2\.attentions\.0\.to_k\.weight"):
    vq_import.import_vq(ckpt, str(tmp_path / "out"), norm_num_groups=GROUPS)
  bn = {"encoder.norm_out.running_mean": torch.zeros(32),
        "encoder.norm_out.running_var": torch.ones(32)}
  ckpt, _ = _llamagen_checkpoint(state, tmp_path, "bn.pt", **bn)
  with pytest.raises(vq_import.UnsupportedLayoutError, match=r"unsupported \(2\): encoder\."
                     r"norm_out\.running_mean \(batch norm; only GroupNorm is supported\)"):
    vq_import.import_vq(ckpt, str(tmp_path / "out"), norm_num_groups=GROUPS)
  # decoder_ch_mult != encoder_ch_mult: a decoder of narrower levels.
  other = {k: v.detach().numpy() for k, v in _diffusers_vq(1, (8, 16, 16)).state_dict().items()}
  decoder = ("decoder.", "post_quant_conv.")
  mixed = {**{k: v for k, v in state.items() if not k.startswith(decoder)},
           **{k: v for k, v in other.items() if k.startswith(decoder)}}
  ckpt, _ = _llamagen_checkpoint(mixed, tmp_path, "mult.pt")
  with pytest.raises(vq_import.UnsupportedLayoutError, match=r"mult\.pt: decoder channels "
                     r"\(16, 16, 8\) \(deepest first\) do not mirror the encoder's \(8, 16, 32\)"):
    vq_import.import_vq(ckpt, str(tmp_path / "out"), norm_num_groups=GROUPS)
  assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------- quantizer


def test_l2_normalised_nearest_codes_match_brute_force():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5, 8)).astype(np.float32) * rng.uniform(0.1, 10, (3, 5, 1))
  codebook = (rng.normal(size=(17, 8)) * rng.uniform(0.1, 10, (17, 1))).astype(np.float32)
  cos = np.einsum("...d,kd->...k", z / np.linalg.norm(z, axis=-1, keepdims=True),
                  codebook / np.linalg.norm(codebook, axis=-1, keepdims=True))
  want = np.argmax(cos, -1)
  np.testing.assert_array_equal(np.asarray(quantizer.nearest_codes(z, codebook, l2_norm=True)),
                                want)
  assert (np.asarray(quantizer.nearest_codes(z, codebook)) != want).any()  # it is a change
  np.testing.assert_allclose(np.linalg.norm(np.asarray(quantizer.l2_normalize(codebook)), axis=-1),
                             1.0, rtol=1e-6)
