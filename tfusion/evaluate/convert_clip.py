"""OpenAI / open_clip CLIP checkpoints -> tfusion's CLIP .npz: `tfusion-convert-clip`.

  tfusion-convert-clip --input ViT-B-32.pt --output clip_b32.npz            # OpenAI archive
  tfusion-convert-clip --input open_clip_model.safetensors --open-clip-config ViT-B-32 \
      --output clip_b32_laion.npz                                          # open_clip weights

Inputs: OpenAI's TorchScript archives (QuickGELU implied), open_clip state dicts (.pt/.pth/.bin,
bare or under "state_dict", "module." prefixes dropped) and .safetensors files. Sizes are read
from the tensors (as open_clip's build_model_from_openai_state_dict); what tensors do not
show comes from `--open-clip-config` (an open_clip model config JSON file, or a model name
found in the installed open_clip), else the defaults: 64-wide heads, GELU unless
`--quick-gelu`, class-token pooling. Architectures outside tfusion's CLIP (ResNet towers,
timm/HF towers, attentional pooling, layer scale, ...) are refused with the reason.
Linear weights [out, in] become kernels [in, out]; the patch conv [W, 3, p, p] becomes [p, p, 3, W].
"""

import argparse
import dataclasses
import json
import os
import re
import warnings
import zipfile

import numpy as np

from tfusion.evaluate import clip

HEAD_WIDTH = 64
# open_clip config keys whose non-default values tfusion's CLIP does not implement.
_UNSUPPORTED = {
    "vision_cfg": {"ls_init_value": None, "patch_dropout": None, "attentional_pool": False,
                   "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
                   "timm_model_name": None, "act_kwargs": None, "norm_kwargs": None,
                   "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                   "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                   "scale_fc": False},
    "text_cfg": {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                 "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
                 "proj_type": "linear", "hf_model_name": None, "act_kwargs": None,
                 "norm_kwargs": None, "block_type": None, "qk_norm": False,
                 "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                 "scale_attn": False, "scale_fc": False},
}


def read_open_clip_config(name_or_path):
  """An open_clip model config (dict): a JSON path, or a model name in the installed open_clip."""
  path = name_or_path
  if not os.path.exists(path):
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.origin:
      raise FileNotFoundError(f"open_clip config {name_or_path!r}: no such file, and open_clip "
                              "is not installed to look the name up")
    path = os.path.join(os.path.dirname(spec.origin), "model_configs", f"{name_or_path}.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"open_clip config {name_or_path!r}: no such file or model name")
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  problems = []
  if "vision_cfg" not in cfg or "text_cfg" not in cfg:
    problems.append("needs vision_cfg and text_cfg")
  if isinstance(cfg.get("vision_cfg", {}).get("layers"), (list, tuple)):
    problems.append("vision_cfg.layers is a list (ResNet image tower)")
  for tower, defaults in _UNSUPPORTED.items():
    for key, default in defaults.items():
      value = cfg.get(tower, {}).get(key, default)
      if value != default and not (key == "patch_dropout" and not value):
        problems.append(f"{tower}.{key}={value!r}")
  if cfg.get("vision_cfg", {}).get("pool_type", "tok") not in ("tok", "avg"):
    problems.append(f"vision_cfg.pool_type={cfg['vision_cfg']['pool_type']!r}")
  if problems:
    raise ValueError(f"{path}: not supported by tfusion's CLIP: " + ", ".join(problems))
  return cfg


def _normalize_keys(state_dict):
  out = {}
  for key, value in state_dict.items():
    key = key.removeprefix("module.")
    key = key.removeprefix("text.")  # CustomTextCLIP keeps the text tower under "text."
    if key in ("input_resolution", "context_length", "vocab_size") or key.endswith("attn_mask"):
      continue  # metadata entries of OpenAI archives; the causal-mask buffer of scripted models
    out[key] = np.asarray(value, np.float32)
  return out


def infer_config(state_dict, open_clip_config=None, quick_gelu=None):
  """CLIPConfig from tensor shapes (+ an open_clip config dict for heads/activation/pooling)."""
  sd = state_dict
  for key in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection"):
    if key not in sd:
      raise ValueError(f"not a ViT CLIP state dict: no {key!r}")
  oc = open_clip_config or {}
  vcfg, tcfg = oc.get("vision_cfg", {}), oc.get("text_cfg", {})
  vision_width, _, _, patch = sd["visual.conv1.weight"].shape
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  text_width = sd["ln_final.weight"].shape[0]

  def layers(prefix):
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})

  def mlp_ratio(prefix):
    return sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / (
        vision_width if prefix else text_width)

  for tower, width, key in (("vision", vision_width, "head_width"), ("text", text_width, "heads")):
    if not (vcfg if tower == "vision" else tcfg).get(key) and width % HEAD_WIDTH:
      raise ValueError(f"{tower} width {width} is not a multiple of {HEAD_WIDTH}: give the model's "
                       "open_clip config (--open-clip-config) for its number of heads")
  if quick_gelu is None:
    quick_gelu = bool(oc.get("quick_gelu", False))
  return clip.CLIPConfig(
      embed_dim=sd["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
      vision_width=vision_width, vision_layers=layers("visual."),
      vision_heads=vision_width // vcfg.get("head_width", HEAD_WIDTH),
      vision_mlp_ratio=mlp_ratio("visual."), vision_pool=vcfg.get("pool_type", "tok"),
      context_length=sd["positional_embedding"].shape[0],
      vocab_size=sd["token_embedding.weight"].shape[0], text_width=text_width,
      text_layers=layers(""), text_heads=tcfg.get("heads", text_width // HEAD_WIDTH),
      text_mlp_ratio=mlp_ratio(""), quick_gelu=quick_gelu)


def _param_path(key):
  """torch key -> tfusion param path (without "params/"), or None if unknown."""
  tower = "visual" if key.startswith("visual.") else "text"
  key = key.removeprefix("visual.")
  key = re.sub(r"resblocks\.(\d+)\.", r"resblocks_\1.", key)
  key = key.replace("attn.in_proj_weight", "attn.in_proj.weight")
  key = key.replace("attn.in_proj_bias", "attn.in_proj.bias")
  if key == "logit_scale":
    return "logit_scale"
  if key == "token_embedding.weight":
    return "text/token_embedding/embedding"
  *module, leaf = key.split(".")
  if not module:
    return f"{tower}/{leaf}"  # class_embedding, positional_embedding, proj, text_projection
  is_norm = module[-1].startswith("ln_")
  leaf = {"weight": "scale" if is_norm else "kernel", "bias": "bias"}.get(leaf)
  return None if leaf is None else "/".join([tower, *module, leaf])


def state_dict_to_params(state_dict, config, source="state dict"):
  """Normalized torch state dict -> flat {"visual/conv1/kernel": array} checked against config."""
  expected = clip.param_shapes(config)
  flat, unknown = {}, []
  for key, value in state_dict.items():
    path = _param_path(key)
    if path is None or path not in expected:
      unknown.append(key)
      continue
    if path.endswith("conv1/kernel"):
      value = value.transpose(2, 3, 1, 0)
    elif path.endswith("/kernel"):
      value = value.T
    flat[path] = value.reshape(expected[path]) if path == "logit_scale" else value
  problems = [f"not part of tfusion's CLIP: {', '.join(unknown[:8])}"] if unknown else []
  missing = sorted(set(expected) - set(flat))
  if missing:
    problems.append(f"missing: {', '.join(missing[:8])}")
  problems += [f"{k}: checkpoint {flat[k].shape}, config {expected[k]}" for k in sorted(flat)
               if flat[k].shape != expected[k]]
  if problems:
    raise ValueError(f"{source}: " + "; ".join(problems))
  return flat


def load_checkpoint(path):
  """Reads a checkpoint -> ({torch key: numpy array}, is_openai_archive)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"CLIP checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return load_file(path), False
  try:
    import torch
  except ImportError:
    raise ImportError("reading PyTorch checkpoints needs torch (pip install "
                      "'tfusion[crosscheck]'), or convert a .safetensors file") from None
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      torchscript = any(n.endswith("constants.pkl") for n in z.namelist())
    if torchscript:  # OpenAI's released .pt files are TorchScript archives
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still reads them
        state = torch.jit.load(path, map_location="cpu").state_dict()
      return {k: v.float().numpy() for k, v in state.items()}, True
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}, False


def convert(input_path, output_path, open_clip_config=None, quick_gelu=None):
  """Converts a checkpoint to tfusion's .npz; returns the CLIPConfig."""
  raw, openai = load_checkpoint(input_path)
  state = _normalize_keys(raw)
  oc = read_open_clip_config(open_clip_config) if open_clip_config else None
  if quick_gelu is None and openai and oc is None:
    quick_gelu = True  # OpenAI trained with QuickGELU
  config = infer_config(state, oc, quick_gelu)
  flat = state_dict_to_params(state, config, source=input_path)
  with open(output_path, "wb") as f:
    np.savez(f, config=np.array(config.to_json()), **{"params/" + k: v for k, v in flat.items()})
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="OpenAI .pt, open_clip .pt/.bin/.safetensors")
  parser.add_argument("--output", required=True, help="output .npz")
  parser.add_argument("--open-clip-config", help="open_clip model config JSON or model name")
  parser.add_argument("--quick-gelu", action="store_true", default=None,
                      help="QuickGELU activations (OpenAI-trained weights)")
  args = parser.parse_args(argv)
  config = convert(args.input, args.output, args.open_clip_config, args.quick_gelu)
  print(f"wrote {args.output}")
  print(json.dumps(dataclasses.asdict(config), indent=1))


if __name__ == "__main__":
  main()
