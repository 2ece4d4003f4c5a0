"""Older AutoencoderKL tensor names -> diffusers' current names, so one loader reads them all.

Two layouts besides the current diffusers one are common in the wild:
- diffusers before 0.14 named the mid-block attention "query/key/value/proj_attn" (files such
  as many hub VAEs saved in 2022 still carry these names);
- the original CompVis/Stability (LDM) layout of single-file VAEs ("encoder.down.0.block.1...",
  "decoder.up.3.upsample...", "mid.attn_1.q" as 1x1 convs), optionally inside a whole
  Stable Diffusion checkpoint under "first_stage_model." or "vae.".
Decoder levels are numbered in opposite orders: LDM's up.{i} is diffusers' up_blocks.{n-1-i}.
"""

import re

import numpy as np

_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                  "proj_out": "to_out.0"}
_LDM_PREFIXES = ("first_stage_model.", "vae.")
_LDM_MARKER = re.compile(r"^(encoder\.(down|mid)|decoder\.(up|mid))\.")


def is_ldm_layout(keys):
  return any(_LDM_MARKER.match(k) or k.startswith(_LDM_PREFIXES) for k in keys)


def _ldm_key(key, num_up):
  """One LDM name -> diffusers name (unchanged when it is not an LDM name)."""
  key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
  key = re.sub(r"^(encoder|decoder)\.mid\.block_([12])\.",
               lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
  m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", key)
  if m:
    return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION[m[2]]}.{m[3]}"
  key = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", key)
  key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.",
               key)
  key = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.resnets.{m[2]}.", key)
  key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{num_up - 1 - int(m[1])}.upsamplers.0.", key)
  return key.replace(".nin_shortcut.", ".conv_shortcut.")


def to_current_names(state_dict):
  """{name: array} in any of the layouts above -> {diffusers name: array}.

  Attention projections stored as 1x1 convs ([c, c, 1, 1]) become linear weights ([c, c]).
  Current-layout dicts come back unchanged.
  """
  if is_ldm_layout(state_dict):
    prefixed = [p for p in _LDM_PREFIXES if any(k.startswith(p) for k in state_dict)]
    if prefixed:  # a whole SD checkpoint: keep only the VAE's tensors
      state_dict = {k[len(prefixed[0]):]: v for k, v in state_dict.items()
                    if k.startswith(prefixed[0])}
    ups = [int(m[1]) for k in state_dict for m in [re.match(r"^decoder\.up\.(\d+)\.", k)] if m]
    num_up = max(ups) + 1 if ups else 0
    state_dict = {_ldm_key(k, num_up): v for k, v in state_dict.items()}
  out = {}
  for key, value in state_dict.items():
    m = re.match(r"^(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", key)
    if m:
      key = f"{m[1]}.{_OLD_ATTENTION[m[2]]}.{m[3]}"
    if re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) and \
        np.ndim(value) == 4 and tuple(np.shape(value)[2:]) == (1, 1):
      value = np.asarray(value)[:, :, 0, 0]
    out[key] = value
  return out
