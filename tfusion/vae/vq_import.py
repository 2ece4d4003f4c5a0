"""Public VQ-VAE weights -> a project VQ-VAE directory (tfusion/vae/vq.py's layout).

  tfusion-import-vq SRC OUT_DIR [--format auto|diffusers|taming|llamagen] [--norm-groups 32]

Three source layouts, all the same network (conv_in, levels of ResNet blocks with a strided
conv between levels, optionally a self-attention after each resnet of a level, a mid block of
resnet-attention-resnet, GroupNorm + SiLU + conv_out, 1x1 quant_conv, codebook, 1x1
post_quant_conv, the mirrored decoder):
- diffusers `VQModel` directories (config.json + diffusion_pytorch_model.safetensors) are
  already our layout: `load_vq` reads them as they are; importing validates and re-saves.
- taming-transformers VQGAN (`encoder.down.{i}.block.{j}`, `mid.block_1/attn_1/block_2`,
  `nin_shortcut`, attention q/k/v/proj_out as 1x1 convs, level attention
  `encoder.down.{i}.attn.{j}` / `decoder.up.{i}.attn.{j}` at the attn_resolutions);
  `decoder.up.{i}` is indexed by resolution level, so it is diffusers' `up_blocks.{n-1-i}`.
  Lightning checkpoints nest the weights under "state_dict" beside the loss/discriminator
  (`loss.*`, ignored).
- LlamaGen's VQ (`encoder.conv_blocks.{i}.res.{j}` / `.attn.{j}`, `mid.{0,1,2}`, under
  "model"; level attention in the deepest level): its decoder `conv_blocks.{k}` already run
  deepest first (= `up_blocks.{k}`), and its codebook is used L2-normalised (codebook_l2_norm):
  the import stores the normalised codebook and sets `codebook_l2_norm` in config.json.
Level attention becomes diffusers' Attn{Down,Up}*Block2D (`*_blocks.{i}.attentions.{j}`); which
levels attend is read from the tensors present, the rest of the architecture from tensor
shapes; GroupNorm's group count is not in the weights (32 in taming and LlamaGen:
--norm-groups). Layouts our Encoder/Decoder cannot express are refused naming the file and the
keys: batch norm, 3x3 conv shortcuts, pooling instead of strided convs, decoder channels that
do not mirror the encoder's, a level whose attention does not follow every resnet, any tensor
we do not know.
"""

import argparse
import json
import os
import re

import numpy as np

from tfusion.vae import vq as vq_lib, weights as weights_lib
from tfusion.vae.model import VAEConfig

FORMATS = ("auto", "diffusers", "taming", "llamagen")
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
# Training-time tensors that are not part of the network: loss and discriminator (taming),
# LlamaGen's codebook-usage buffer, EMA codebook statistics (taming's EMAVectorQuantizer).
_IGNORED = re.compile(r"^(loss\.|discriminator\.|quantize\.codebook_used$|"
                      r"quantize\.embedding\.(cluster_size|embed_avg)$)")


class UnsupportedLayoutError(ValueError):
  """The checkpoint's network is not one tfusion's VQ-VAE can express (names the keys)."""


# ------------------------------------------------------------------------------- reading


def read_state_dict(path):
  """A checkpoint file -> {name: float32 numpy array}.

  .safetensors are read with numpy; .pt/.ckpt/.pth/.bin need torch (weights_only unpickling:
  tensors and plain containers only). Weights nested under "state_dict" (Lightning) or
  "model" (LlamaGen) are unwrapped; a "module." prefix (DDP) is dropped.
  """
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    state = load_file(path)
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{path}: reading a PyTorch checkpoint needs torch; install torch or "
                        "convert the file to .safetensors") from e
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle of arbitrary objects: refuse rather than run it
      raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({e}); save "
                       "its state dict alone (torch.save(sd, 'vq.pt')) from a trusted copy") \
          from e
    for _ in range(2):
      for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
          state = state[wrapper]
          break
    if not isinstance(state, dict):
      raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
             if hasattr(v, "detach")}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def detect_format(path, keys):
  """'diffusers' (a directory with config.json), 'llamagen' or 'taming' from the key names."""
  if os.path.isdir(path):
    return "diffusers"
  if any(".conv_blocks." in k for k in keys):
    return "llamagen"
  if any(re.match(r"^(encoder\.(down|mid)|decoder\.(up|mid))\.", k) for k in keys):
    return "taming"
  if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
    raise ValueError(f"{path} has diffusers names: pass the VQModel directory (config.json "
                     "beside the weights), not the weights file")
  raise ValueError(f"{path}: cannot tell the layout (no taming or LlamaGen encoder keys); "
                   "pass --format")


# ------------------------------------------------------------------------------- renaming


def _resnet_part(rest, key, problems):
  """'conv1.weight' inside a source resnet -> its diffusers name (None when refused)."""
  part = rest.split(".")[0]
  if part == "conv_shortcut":  # taming's 3x3 shortcut option; ours is 1x1
    problems.append(f"{key} (3x3 conv_shortcut)")
    return None
  if part not in _RESNET_PARTS or not re.fullmatch(r"\w+\.(weight|bias)", rest):
    problems.append(key)
    return None
  return rest.replace("nin_shortcut", "conv_shortcut")


def _attention_part(prefix, rest, value):
  """An attention tensor (1x1 conv projections) -> (diffusers name, linear weight)."""
  name, leaf = rest.split(".", 1)
  if name != "norm" and leaf == "weight" and value.ndim == 4:
    value = value[:, :, 0, 0]  # [c, c, 1, 1] conv -> [c, c] linear (out, in)
  return f"{prefix}.{_ATTENTION[name]}.{leaf}", value


def _rename(state, rules, source):
  """Renames {source name: array} to diffusers names with `rules` (source-specific).

  rules(key) -> ("resnet", diffusers prefix, rest) | ("attn", prefix, rest) | ("same", key) |
  None (unknown). Raises UnsupportedLayoutError listing every refused key.
  """
  out, unknown, problems = {}, [], []
  for key, value in state.items():
    if _IGNORED.match(key):
      continue
    if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
      problems.append(f"{key} (batch norm; only GroupNorm is supported)")
      continue
    rule = rules(key)
    if rule is None:
      unknown.append(key)
    elif rule[0] == "same":
      out[rule[1]] = value
    elif rule[0] == "attn":
      if not re.fullmatch(r"(norm|q|k|v|proj_out)\.(weight|bias)", rule[2]):
        unknown.append(key)
        continue
      name, value = _attention_part(rule[1], rule[2], value)
      out[name] = value
    else:
      part = _resnet_part(rule[2], key, problems)
      if part:
        out[f"{rule[1]}.{part}"] = value
  lines = []
  if problems:
    lines.append(f"  unsupported ({len(problems)}): {', '.join(sorted(problems)[:8])}")
  if unknown:
    lines.append(f"  unknown tensors ({len(unknown)}): {', '.join(sorted(unknown)[:8])}" +
                 (" ..." if len(unknown) > 8 else ""))
  if lines:
    raise UnsupportedLayoutError(
        "\n".join([f"{source}: this VQ network cannot be expressed by tfusion's VQ-VAE:"] + lines))
  return out


def _levels(keys, pattern):
  return 1 + max((int(m[1]) for k in keys for m in [re.match(pattern, k)] if m), default=-1)


_TOP = re.compile(r"^((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\."
                  r"(weight|bias)$|^quantize\.embedding\.weight$")


def _norm_out(key):
  m = re.match(r"^(encoder|decoder)\.norm_out\.(weight|bias)$", key)
  return ("same", f"{m[1]}.conv_norm_out.{m[2]}") if m else None


def taming_rules(keys):
  """taming-transformers VQGAN names -> rename rules for _rename."""
  num_up = _levels(keys, r"^decoder\.up\.(\d+)\.")

  def rules(key):
    if _TOP.match(key):
      return ("same", key)
    if _norm_out(key):
      return _norm_out(key)
    m = re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.*)$", key)
    if m:
      return ("resnet", f"encoder.down_blocks.{m[1]}.resnets.{m[2]}", m[3])
    m = re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(.*)$", key)
    if m:
      return ("resnet", f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", m[3])
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(.*)$", key)
    if m:
      return ("attn", f"{m[1]}.mid_block.attentions.0", m[2])
    m = re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", key)
    if m:
      return ("same", f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}")
    # decoder.up.{i} is resolution level i (0 = full size): diffusers counts from the deepest.
    m = re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.*)$", key)
    if m:
      return ("resnet", f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}", m[3])
    m = re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", key)
    if m:
      return ("same", f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}")
    m = re.match(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(.*)$", key)  # attn_resolutions
    if m:
      return ("attn", f"encoder.down_blocks.{m[1]}.attentions.{m[2]}", m[3])
    m = re.match(r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(.*)$", key)
    if m:
      return ("attn", f"decoder.up_blocks.{num_up - 1 - int(m[1])}.attentions.{m[2]}", m[3])
    return None

  return rules


def llamagen_rules(keys):
  """LlamaGen tokenizer/tokenizer_image/vq_model.py names -> rename rules for _rename."""
  del keys  # its decoder levels are stored deepest first, as diffusers': no renumbering

  def rules(key):
    if _TOP.match(key):
      return ("same", key)
    if _norm_out(key):
      return _norm_out(key)
    m = re.match(r"^encoder\.conv_blocks\.(\d+)\.res\.(\d+)\.(.*)$", key)
    if m:
      return ("resnet", f"encoder.down_blocks.{m[1]}.resnets.{m[2]}", m[3])
    m = re.match(r"^decoder\.conv_blocks\.(\d+)\.res\.(\d+)\.(.*)$", key)
    if m:
      return ("resnet", f"decoder.up_blocks.{m[1]}.resnets.{m[2]}", m[3])
    m = re.match(r"^encoder\.conv_blocks\.(\d+)\.downsample\.conv\.(weight|bias)$", key)
    if m:
      return ("same", f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}")
    m = re.match(r"^decoder\.conv_blocks\.(\d+)\.upsample\.conv\.(weight|bias)$", key)
    if m:
      return ("same", f"decoder.up_blocks.{m[1]}.upsamplers.0.conv.{m[2]}")
    m = re.match(r"^(encoder|decoder)\.mid\.([02])\.(.*)$", key)
    if m:
      return ("resnet", f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}", m[3])
    m = re.match(r"^(encoder|decoder)\.mid\.1\.(.*)$", key)
    if m:
      return ("attn", f"{m[1]}.mid_block.attentions.0", m[2])
    m = re.match(r"^encoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.(.*)$", key)  # deepest level
    if m:
      return ("attn", f"encoder.down_blocks.{m[1]}.attentions.{m[2]}", m[3])
    m = re.match(r"^decoder\.conv_blocks\.(\d+)\.attn\.(\d+)\.(.*)$", key)  # conv_blocks.0
    if m:
      return ("attn", f"decoder.up_blocks.{m[1]}.attentions.{m[2]}", m[3])
    return None

  return rules


# ------------------------------------------------------------------- architecture from shapes


def _block_types(keys, prefix, levels, resnets, source):
  """Per level of `prefix`: diffusers' block type, Attn* where the level holds attentions.

  A level attends after every one of its resnets (taming, LlamaGen, diffusers) or not at all."""
  plain, attn = (("DownEncoderBlock2D", "AttnDownEncoderBlock2D") if "down" in prefix
                 else ("UpDecoderBlock2D", "AttnUpDecoderBlock2D"))
  kinds = []
  for i in range(levels):
    count = _levels(keys, rf"^{re.escape(prefix)}\.{i}\.attentions\.(\d+)\.")
    if count not in (0, resnets):
      raise UnsupportedLayoutError(
          f"{source}: {prefix}.{i} has attention blocks up to attentions.{count - 1} for "
          f"{resnets} resnets; the layout needs one after every resnet of a level, or none")
    kinds.append(attn if count else plain)
  return tuple(kinds)


def infer_config(state, source, norm_num_groups=32):
  """diffusers-named state dict -> (VAEConfig, num_codes, code_dim), read from tensor shapes.

  Refuses (UnsupportedLayoutError) level counts, block counts or decoder channels that the
  diffusers layout cannot hold; other shape problems surface when the params are loaded.
  """
  def shape(key):
    if key not in state:
      raise weights_lib.WeightMismatchError(f"{source}: missing tensor {key}")
    return state[key].shape

  keys = list(state)
  levels = _levels(keys, r"^encoder\.down_blocks\.(\d+)\.")
  up_levels = _levels(keys, r"^decoder\.up_blocks\.(\d+)\.")
  if levels == 0 or levels != up_levels:
    raise UnsupportedLayoutError(f"{source}: {levels} encoder levels and {up_levels} decoder "
                                 "levels; the layout needs the same number (at least one)")
  per_level = [_levels(keys, rf"^encoder\.down_blocks\.{i}\.resnets\.(\d+)\.")
               for i in range(levels)]
  per_up_level = [_levels(keys, rf"^decoder\.up_blocks\.{i}\.resnets\.(\d+)\.")
                  for i in range(levels)]
  layers = per_level[0]
  if set(per_level) != {layers} or set(per_up_level) != {layers + 1}:
    raise UnsupportedLayoutError(
        f"{source}: resnet blocks per level {per_level} (encoder), {per_up_level} (decoder); the "
        "layout needs the same count n per encoder level and n + 1 per decoder level")
  down_types = _block_types(keys, "encoder.down_blocks", levels, layers, source)
  up_types = _block_types(keys, "decoder.up_blocks", levels, layers + 1, source)
  channels = tuple(int(shape(f"encoder.down_blocks.{i}.resnets.{layers - 1}.conv2.weight")[0])
                   for i in range(levels))
  decoder = tuple(int(shape(f"decoder.up_blocks.{i}.resnets.{layers}.conv2.weight")[0])
                  for i in range(levels))
  if decoder != tuple(reversed(channels)):
    raise UnsupportedLayoutError(
        f"{source}: decoder channels {decoder} (deepest first) do not mirror the encoder's "
        f"{channels} (e.g. LlamaGen decoder_ch_mult != encoder_ch_mult)")
  odd = sorted({c for c in channels if c % norm_num_groups})
  if odd:
    raise UnsupportedLayoutError(f"{source}: channels {odd} are not divisible by "
                                 f"{norm_num_groups} GroupNorm groups (--norm-groups)")
  num_codes, code_dim = (int(d) for d in shape(vq_lib.CODEBOOK_KEY))
  if shape("quant_conv.weight")[0] != code_dim:
    raise weights_lib.WeightMismatchError(
        f"{source}: codebook {vq_lib.CODEBOOK_KEY} {(num_codes, code_dim)} holds {code_dim}-d "
        f"codes; quant_conv.weight {tuple(shape('quant_conv.weight'))} makes "
        f"{shape('quant_conv.weight')[0]}-d vectors")
  config = VAEConfig(
      in_channels=int(shape("encoder.conv_in.weight")[1]),
      out_channels=int(shape("decoder.conv_out.weight")[0]),
      block_out_channels=channels, layers_per_block=layers,
      latent_channels=int(shape("encoder.conv_out.weight")[0]), norm_num_groups=norm_num_groups,
      mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.0.") for k in keys),
      down_block_types=down_types, up_block_types=up_types)
  return config, num_codes, code_dim


# --------------------------------------------------------------------------------- import


def to_vqvae(state, source, *, norm_num_groups=32, codebook_l2_norm=False):
  """diffusers-named state dict -> VQVAE; every tensor checked against the inferred config."""
  import jax
  import jax.numpy as jnp
  from tfusion.vae import quantizer
  config, _, code_dim = infer_config(state, source, norm_num_groups)
  state = dict(state)
  codebook = state.pop(vq_lib.CODEBOOK_KEY)
  if codebook_l2_norm:  # stored normalised, so the file decodes the same read either way
    codebook = np.asarray(quantizer.l2_normalize(jnp.asarray(codebook)))
  params = weights_lib.state_dict_to_params(state, vq_lib.abstract_params(config, code_dim),
                                            source=source)
  return vq_lib.VQVAE(config, jax.tree.map(jnp.asarray, params), jnp.asarray(codebook),
                      codebook_l2_norm=codebook_l2_norm)


def import_vq(src, out_dir, fmt="auto", *, norm_num_groups=32, codebook_l2_norm=None):
  """Converts the checkpoint `src` (file, or a diffusers VQModel directory) into `out_dir`.

  fmt: one of FORMATS. codebook_l2_norm: None = the format's own (True for LlamaGen).
  Returns the VQVAE written.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"VQ checkpoint {src} does not exist")
  if os.path.isdir(src):
    if fmt not in ("auto", "diffusers"):
      raise ValueError(f"{src} is a directory: only a diffusers VQModel directory is one")
    vq = vq_lib.load_vq(src)  # the project's own layout: validate (all tensors) and re-save
    if codebook_l2_norm is not None:
      import dataclasses
      vq = dataclasses.replace(vq, codebook_l2_norm=codebook_l2_norm)
  else:
    state = read_state_dict(src)
    fmt = detect_format(src, state) if fmt == "auto" else fmt
    if fmt == "diffusers":
      raise ValueError(f"{src}: a diffusers VQModel is a directory (config.json + weights)")
    rules = (taming_rules if fmt == "taming" else llamagen_rules)(list(state))
    renamed = _rename(state, rules, src)
    l2 = (fmt == "llamagen") if codebook_l2_norm is None else codebook_l2_norm
    vq = to_vqvae(renamed, src, norm_num_groups=norm_num_groups, codebook_l2_norm=l2)
  vq_lib.save_vq(vq, out_dir)
  return vq


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="checkpoint file (.pt/.ckpt/.safetensors) or VQModel dir")
  parser.add_argument("out_dir", help="where to write config.json + safetensors")
  parser.add_argument("--format", default="auto", choices=FORMATS)
  parser.add_argument("--norm-groups", type=int, default=32,
                      help="GroupNorm groups (not stored in the weights; 32 in taming/LlamaGen)")
  parser.add_argument("--codebook-l2-norm", choices=("auto", "true", "false"), default="auto",
                      help="cosine code lookup (auto: true for LlamaGen, false otherwise)")
  args = parser.parse_args(argv)
  l2 = None if args.codebook_l2_norm == "auto" else args.codebook_l2_norm == "true"
  vq = import_vq(args.src, args.out_dir, args.format, norm_num_groups=args.norm_groups,
                 codebook_l2_norm=l2)
  cfg = vq.config
  print(json.dumps({"out_dir": args.out_dir, "num_codes": vq.num_codes, "code_dim": vq.code_dim,
                    "downsample_factor": cfg.downsample_factor,
                    "block_out_channels": list(cfg.block_out_channels),
                    "codebook_l2_norm": vq.codebook_l2_norm}))


if __name__ == "__main__":
  main()
