"""pytorch-fid Inception weights (.pth) -> tfusion's .npz: `tfusion-convert-inception`.

  tfusion-convert-inception --input pt_inception-2015-12-05-6726825d.pth --output inception_fid.npz

Accepts the public FID file (torchvision Inception3 names, e.g. "Mixed_5b.branch1x1.conv.weight",
with the unused 1008-way "fc" head) and state dicts of pytorch-fid's `InceptionV3` wrapper
("blocks.2.0.branch1x1.conv.weight"). Conv weights [out, in, kh, kw] become kernels
[kh, kw, in, out]; batch norm weight/bias/running_mean/running_var become
params scale/bias and batch_stats mean/var. Needs torch to read the .pth file.
"""

import argparse
import os

import numpy as np

from tfusion.evaluate import inception

# pytorch-fid's InceptionV3 wraps torchvision's modules in blocks: blocks.<i>.<j> -> module name.
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
     "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)
# Tensors of the public file that the pool3 features never use.
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _module_key(key):
  """Wrapper names ("blocks.2.0.x") -> torchvision names ("Mixed_5b.x"); others unchanged."""
  parts = key.split(".")
  if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit():
    block, index = int(parts[1]), int(parts[2])
    if block < len(_WRAPPER_BLOCKS) and index < len(_WRAPPER_BLOCKS[block]):
      return ".".join([_WRAPPER_BLOCKS[block][index], *parts[3:]])
  return key


def state_dict_to_flat(state_dict, source="state dict"):
  """{torch key: array} -> {"params/.../kernel": float32 array} checked against the network.

  Raises inception.WeightsError naming `source` and every missing/unexpected/mis-shaped tensor.
  """
  flat, unknown = {}, []
  for key, value in state_dict.items():
    key = _module_key(key)
    if key.startswith(_UNUSED_PREFIXES) or key.endswith("num_batches_tracked"):
      continue
    *module, layer, leaf = key.split(".")
    array = np.asarray(value, np.float32)
    if layer == "conv" and leaf == "weight" and array.ndim == 4:
      flat["/".join(["params", *module, "conv", "kernel"])] = array.transpose(2, 3, 1, 0)
    elif layer == "bn" and leaf in _BN_LEAVES:
      collection, name = _BN_LEAVES[leaf]
      flat["/".join([collection, *module, "bn", name])] = array
    else:
      unknown.append(key)
  if unknown:
    raise inception.WeightsError(f"{source}: tensors that are not part of the FID InceptionV3: "
                                 + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
  inception.check_flat(flat, source)
  return flat


def load_torch_state_dict(path):
  """Reads a .pth file to {key: numpy array} (unwraps {"state_dict": ...})."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"PyTorch weights file {path!r} does not exist")
  try:
    import torch
  except ImportError:
    raise ImportError("reading .pth files needs torch "
                      "(pip install 'tfusion[crosscheck]')") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def convert(input_path, output_path):
  """Converts `input_path` (.pth) to `output_path` (.npz); returns the weights hash."""
  flat = state_dict_to_flat(load_torch_state_dict(input_path), source=input_path)
  with open(output_path, "wb") as f:
    np.savez(f, **flat)
  return inception.weights_hash(flat)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="pytorch-fid .pth state dict")
  parser.add_argument("--output", required=True, help="output .npz")
  args = parser.parse_args(argv)
  digest = convert(args.input, args.output)
  print(f"wrote {args.output} (network hash {digest[:16]})")


if __name__ == "__main__":
  main()
