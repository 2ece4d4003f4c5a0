"""FID InceptionV3: equivalence with pytorch-fid's network (random weights, no download), the
converter's two input layouts, the 299 resize, and weight-file errors."""

import numpy as np
import pytest

from tfusion.evaluate import convert_inception, inception


def _random_fid_state_dict(torch, torchvision):
  """A state dict in the public file's layout (torchvision names, 1008-way fc), random values.

  Conv weights are He-scaled and batch norms get random statistics/affines, so activations stay
  O(1) through the 20-odd layers and every tensor's mapping matters.
  """
  shell = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                          init_weights=False)
  g = torch.Generator().manual_seed(0)
  out = {}
  for key, v in shell.state_dict().items():
    if key.endswith("num_batches_tracked"):
      out[key] = v
    elif key.endswith("conv.weight"):
      out[key] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    elif key.endswith(("running_var", "bn.weight")):
      out[key] = torch.rand(v.shape, generator=g) + 0.5
    else:  # running_mean, bn.bias, fc
      out[key] = torch.randn(v.shape, generator=g) * 0.1
  return out


@pytest.fixture(scope="module")
def pytorch_fid_net(tmp_path_factory):
  """(pytorch-fid InceptionV3 with random weights, its wrapper .pth, the public-layout .pth)."""
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  pfi = pytest.importorskip("pytorch_fid.inception")
  from unittest import mock
  public = _random_fid_state_dict(torch, torchvision)
  # fid_inception_v3() downloads the weights; hand it ours instead.
  with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: public):
    net = pfi.InceptionV3([pfi.InceptionV3.DEFAULT_BLOCK_INDEX], use_fid_inception=True).eval()
  folder = tmp_path_factory.mktemp("inception")
  wrapper_path, public_path = folder / "wrapper.pth", folder / "public.pth"
  torch.save(net.state_dict(), wrapper_path)
  torch.save(public, public_path)
  return net, str(wrapper_path), str(public_path)


@pytest.mark.crosscheck
def test_pool_features_match_pytorch_fid(pytorch_fid_net, tmp_path):
  import torch
  net, wrapper_path, _ = pytorch_fid_net
  npz = str(tmp_path / "inception.npz")
  convert_inception.main(["--input", wrapper_path, "--output", npz])
  # Non-square, not 299: exercises the resize and the H/W order. uint8 as read from files;
  # pytorch-fid's loader (ToTensor) divides by 255.
  images = np.random.default_rng(0).integers(0, 256, (2, 96, 128, 3), dtype=np.uint8)
  with torch.no_grad():
    ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0][:, :, 0, 0].numpy()
  ours = inception.FIDInception(npz, batch_size=2)(images)
  diff = np.abs(ours - ref).max()
  print(f"\nInceptionV3 pool3 vs pytorch-fid: max abs diff {diff:.3g} (max |feature| "
        f"{np.abs(ref).max():.3g})")
  assert ours.shape == (2, inception.FEATURE_DIM)
  # float32 both sides, same ops up to summation order; measured ~2e-5 on features up to ~30.
  assert diff <= 1e-5 * np.abs(ref).max() + 1e-5


@pytest.mark.crosscheck
def test_converter_reads_public_and_wrapper_layouts_alike(pytorch_fid_net):
  _, wrapper_path, public_path = pytorch_fid_net
  a = convert_inception.state_dict_to_flat(convert_inception.load_torch_state_dict(wrapper_path))
  b = convert_inception.state_dict_to_flat(convert_inception.load_torch_state_dict(public_path))
  assert sorted(a) == sorted(b)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert inception.weights_hash(a) == inception.weights_hash(b)


@pytest.mark.crosscheck
@pytest.mark.parametrize("size", [(32, 32), (256, 256), (299, 299), (512, 384), (75, 300)])
def test_resize_matches_torch_interpolate(size):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).random((1, *size, 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                        mode="bilinear", align_corners=False)
  ours = np.asarray(inception.resize_like_pytorch_fid(x))
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_missing_weights_file_names_it_and_the_converter(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz.*tfusion-convert-inception"):
    inception.FIDInception(path)


def test_wrong_weights_file_lists_the_problems(tmp_path):
  shapes = inception.variable_shapes()
  flat = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  del flat["params/Mixed_5b/branch1x1/conv/kernel"]
  flat["params/Mixed_7c/branch_pool/conv/kernel"] = np.zeros((1, 1, 2048, 7), np.float32)
  flat["params/extra/kernel"] = np.zeros((1,), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **flat)
  with pytest.raises(inception.WeightsError) as err:
    inception.load_weights(path)
  msg = str(err.value)
  assert "bad.npz" in msg and "Mixed_5b/branch1x1/conv/kernel" in msg
  assert "Mixed_7c/branch_pool" in msg and "extra/kernel" in msg
  (tmp_path / "junk.npz").write_text("not a zip")
  with pytest.raises(inception.WeightsError, match="junk.npz"):
    inception.load_weights(str(tmp_path / "junk.npz"))


def test_weights_round_trip_and_hash_follows_content(tmp_path):
  shapes = inception.variable_shapes()
  rng = np.random.default_rng(0)
  flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  path = str(tmp_path / "w.npz")
  np.savez(path, **flat)
  variables, digest = inception.load_weights(path)
  assert digest == inception.weights_hash(flat)
  assert set(variables) == {"params", "batch_stats"}
  flat["params/Conv2d_1a_3x3/conv/kernel"][0, 0, 0, 0] += 1.0
  assert inception.weights_hash(flat) != digest
