"""Training FLOPs per step and device peaks, for the MFU in the train log.

FLOPs per step = B * L * (6 * N_matmul + 12 * layers * L * heads * head_dim), where N_matmul is
the parameter count without the token embedding table (a lookup, not a matmul) and the second
term is attention (QK^T and AV, forward 4 * L * H * Dh per token and layer, x3 with the
backward) counted over the full L x L scores the dense kernel computes. The image encoder and
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


def train_flops_per_step(config, num_params):
  """Model FLOPs of one training step (see module docstring)."""
  m = config.model
  batch, length = config.data.batch_size, config.data.seq_len
  n_matmul = num_params - m.vocab_size * m.d_model
  attention = 12 * m.num_layers * length * m.num_heads * m.head_dim
  return batch * length * (6 * n_matmul + attention)
