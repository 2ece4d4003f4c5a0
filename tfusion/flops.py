"""Training FLOPs per step and device peaks, for the MFU in the train log.

FLOPs per step = 6 * N_matmul * B * L + 12 * layers * heads * head_dim * P, where N_matmul is
the parameter count without the token embedding table (a lookup, not a matmul) and the second
term is attention (QK^T and AV, forward 4 * H * Dh per (query, key) pair and layer, x3 with the
backward) over the P pairs the Transfusion mask allows (B * L^2 when not given). Blocks a
kernel skips, or computes and masks, never change P: the MFU is model FLOPs. The same formula
with the pairs the kernel computes (attention.computed_pairs: L^2 for dense, whole visited
blocks otherwise) gives hardware FLOPs, logged as the HFU; HFU - MFU is work on masked elements. The image encoder and
decoder are included in N_matmul as if applied per position (exact for the linear layers at
image positions; an approximation for the U-Net's convolutions).
"""

# Dense bf16 peak FLOP/s per chip, by jax device_kind.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(devices):
  """Summed peak of `devices` (all devices of the job), or None when unknown (e.g. CPU)."""
  total = 0.0
  for d in devices:
    kind = getattr(d, "device_kind", "")
    peak = PEAK_BF16_FLOPS.get(kind)
    if peak is None:
      peak = next((v for k, v in PEAK_BF16_FLOPS.items() if kind.startswith(k)), None)
    if peak is None:
      return None
    total += peak
  return total


def train_flops_per_step(config, num_params, attn_pairs=None):
  """Model FLOPs of one training step (see module docstring).

  attn_pairs: the (query, key) pairs the batch's mask allows, summed over its rows
  (tfusion.model.attention.allowed_pairs); None counts every pair of the dense L x L scores.
  """
  m = config.model
  batch, length = config.data.batch_size, config.data.seq_len
  n_matmul = num_params - m.vocab_size * m.d_model
  if attn_pairs is None:
    attn_pairs = batch * length * length
  return 6 * n_matmul * batch * length + 12 * m.num_layers * m.num_heads * m.head_dim * attn_pairs
