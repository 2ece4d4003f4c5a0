"""diffusers AutoencoderKL state dicts (safetensors, PyTorch layout) <-> Flax params.

Key mapping: "encoder.down_blocks.0.resnets.1.conv1.weight" ->
("encoder", "down_blocks_0_resnets_1", "conv1", "kernel"). Conv kernels go from
[out, in, kh, kw] to [kh, kw, in, out], linear weights are transposed, norm weights become
`scale`. Loading checks every tensor and reports all mismatches at once.
"""

import re

import numpy as np


class WeightMismatchError(ValueError):
  """The weights file does not match the configured architecture (lists every problem)."""


def _flax_path(key):
  """"encoder.down_blocks.0.resnets.1.conv1.weight" -> (encoder, down_blocks_0_resnets_1, conv1, weight)."""
  tokens = []
  for part in key.split("."):
    if part.isdigit() and tokens:
      tokens[-1] = f"{tokens[-1]}_{part}"
    else:
      tokens.append(part)
  merged = []
  for tok in tokens:  # our blocks are flat: down_blocks_i's children are named down_blocks_i_<child>
    if merged and re.fullmatch(r"(down|up)_blocks_\d+", merged[-1]):
      merged[-1] = f"{merged[-1]}_{tok}"
    else:
      merged.append(tok)
  return tuple(merged)


def _is_norm(path):
  return any(p.startswith("norm") or p in ("group_norm", "conv_norm_out") for p in path[-2:-1])


def torch_to_flax(path, array):
  """Maps one diffusers tensor to (flax path, flax array)."""
  *parents, leaf = path
  if leaf == "bias":
    return (*parents, "bias"), array
  if leaf != "weight":
    raise KeyError(leaf)
  if array.ndim == 4:
    return (*parents, "kernel"), np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:
    return (*parents, "kernel"), array.T
  if array.ndim == 1 and _is_norm(path):
    return (*parents, "scale"), array
  raise KeyError(f"unexpected 1-d weight {'.'.join(path)}")


def flax_to_torch(path, array):
  """Inverse of torch_to_flax: -> (diffusers key, array in PyTorch layout)."""
  *parents, leaf = path
  parts = []
  for p in parents:
    parts.extend(_split_numbers(p))
  key = ".".join(parts)
  if leaf == "bias":
    return f"{key}.bias", array
  if leaf == "scale":
    return f"{key}.weight", array
  if array.ndim == 4:
    return f"{key}.weight", np.transpose(array, (3, 2, 0, 1))
  return f"{key}.weight", array.T


def _split_numbers(name):
  """"down_blocks_0_resnets_1" -> ["down_blocks.0.resnets.1"]; "to_out_0" -> ["to_out.0"]."""
  name = re.sub(r"_(\d+)(?=_|$)", r".\1", name)
  return [re.sub(r"(\.\d+)_", r"\1.", name)]


def state_dict_to_params(state_dict, abstract_params, *, source="weights"):
  """Converts a diffusers state dict to the nested Flax params matching `abstract_params`.

  Older layouts (pre-0.14 diffusers attention names, CompVis/LDM single files) are renamed
  first (tfusion/vae/legacy_keys.py). Raises WeightMismatchError listing missing, unexpected and
  mis-shaped tensors.
  """
  import flax
  from tfusion.vae import legacy_keys

  state_dict = legacy_keys.to_current_names(state_dict)
  expected = flax.traverse_util.flatten_dict(abstract_params)
  got, unexpected, misshaped = {}, [], []
  for key, tensor in state_dict.items():
    try:
      path, value = torch_to_flax(_flax_path(key), np.asarray(tensor))
    except KeyError:
      unexpected.append(key)
      continue
    if path not in expected:
      unexpected.append(key)
    elif tuple(expected[path].shape) != tuple(value.shape):
      misshaped.append(f"{key}: file {tuple(np.asarray(tensor).shape)}, model expects "
                       f"{flax_to_torch(path, np.zeros(expected[path].shape))[1].shape}")
    else:
      got[path] = value.astype(np.float32)
  missing = [flax_to_torch(p, np.zeros(v.shape))[0] for p, v in expected.items() if p not in got
             and not any(m.startswith(flax_to_torch(p, np.zeros(v.shape))[0]) for m in misshaped)]
  if missing or unexpected or misshaped:
    lines = [f"{source} does not match the configured VAE architecture:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)[:20]) +
                     (" ..." if len(items) > 20 else ""))
    raise WeightMismatchError("\n".join(lines))
  return flax.traverse_util.unflatten_dict(got)


def params_to_state_dict(params):
  """Flax params -> {diffusers key: numpy array in PyTorch layout}."""
  import flax
  return dict(flax_to_torch(path, np.asarray(v))
              for path, v in flax.traverse_util.flatten_dict(params).items())
