"""Named rematerialisation policies for the scanned trunk (`config.model.remat`).

What each block keeps from the forward pass for the backward (B rows, L positions, d width,
H heads x Dh, F = mlp_dim, per layer; bf16 = 2 bytes each):
  none       everything: ~ B * L * (10 d + 3 F) values plus the fp32 attention scores
             B * H * L * L (the dense kernel) — fastest, by far the most memory.
  minimal    (= dots) the outputs of matmuls without batch dims: q/k/v/o, gate/up/down
             projections; recomputes norms, RoPE, softmax and the attention itself.
  qkv        only the q, k, v projections (checkpoint names below); recomputes the rest.
  qkv_attn   q, k, v and the attention context (before the output projection): the attention
             (the L^2 part) is not recomputed.
  full       only the block's input: recomputes the whole block (~ +1 forward, least memory).
  qkv_offload  like qkv, but the saved tensors go to pinned host memory (TPU / GPU; compiled
             for a v5e topology here, never run; on XLA:CPU host and device are one memory).
"""

import jax
from jax.ad_checkpoint import checkpoint_name  # noqa: F401  (re-exported for layers.py)

QKV = ("q_proj", "k_proj", "v_proj")
ATTN_CONTEXT = "attn_context"

_cp = jax.checkpoint_policies
POLICIES = {
    "none": None,
    "minimal": _cp.checkpoint_dots_with_no_batch_dims,
    "dots": _cp.checkpoint_dots_with_no_batch_dims,
    "qkv": _cp.save_only_these_names(*QKV),
    "qkv_attn": _cp.save_only_these_names(*QKV, ATTN_CONTEXT),
    "full": _cp.nothing_saveable,
    "qkv_offload": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(QKV),
        offload_src="device", offload_dst="pinned_host"),
}


def policy(name):
  """The jax.checkpoint policy for `name` (None for "none"); a one-line error otherwise."""
  if name not in POLICIES:
    raise ValueError(f"config.model.remat must be one of {list(POLICIES)}, got {name!r}")
  return POLICIES[name]
