"""The Transfusion model: one transformer over text tokens and noisy image patches.

Inputs follow the batch contract (DESIGN.md). The forward pass:
  1. noisy latents [B, M, h, w, c] -> patch vectors [B, M, N, d] (linear or U-Net encoder,
     timestep embedding added);
  2. patch vectors are placed at the positions `image_index` marks; text positions take token
     embeddings;
  3. the trunk runs with the Transfusion mask (tfusion/model/attention.py), handed to the
     attention kernels as `attention.Intervals` (never a dense [B, L, L] mask);
  4. text logits at every position; the hidden states of each image's span are gathered back
     per slot and decoded to a prediction [B, M, h, w, c] (epsilon or velocity).
The pieces are separate methods so that generation can run them with a KV cache.

With config.model.image.representation="discrete" (the Chameleon baseline, tfusion/discrete.py)
images are VQ tokens in the vocabulary: the model has no image layers, ignores `image_index`
and the latents, and runs causal attention over every position (`text_forward`).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tfusion import discrete as discrete_lib
from tfusion.model import attention as attention_lib
from tfusion.model import image_io
from tfusion.model import layers
from tfusion.model import layout


def place_patches(text_embeddings, patch_vectors, image_index):
  """Puts each image's patch vectors at its span in the row.

  Args:
    text_embeddings: [B, L, d] token embeddings.
    patch_vectors: [B, M, N, d] per-slot patch vectors.
    image_index: int [B, L], slot per position, -1 where no image.
  Returns:
    [B, L, d]: patch vectors at patch positions, text embeddings elsewhere.
  """
  b, m, n, d = patch_vectors.shape
  flat = patch_vectors.reshape(b, m * n, d)
  idx = jnp.maximum(image_index, 0) * n + jnp.maximum(layout.patch_numbers(image_index), 0)
  gathered = jnp.take_along_axis(flat, jnp.minimum(idx, m * n - 1)[:, :, None], axis=1)
  return jnp.where((image_index >= 0)[:, :, None], gathered.astype(text_embeddings.dtype),
                   text_embeddings)


def gather_patches(hidden, image_index, num_slots, num_patches):
  """Collects the hidden states of each slot's span.

  Args:
    hidden: [B, L, d].
    image_index: int [B, L].
    num_slots: M. num_patches: N.
  Returns:
    [B, M, N, d]; slots with no span in the row hold arbitrary (finite) rows.
  """
  b, length, d = hidden.shape
  slots = jnp.arange(num_slots, dtype=image_index.dtype)
  starts = jnp.argmax(image_index[:, None, :] == slots[None, :, None], axis=-1)  # [B, M]
  pos = jnp.minimum(starts[:, :, None] + jnp.arange(num_patches)[None, None, :], length - 1)
  out = jnp.take_along_axis(hidden, pos.reshape(b, num_slots * num_patches, 1), axis=1)
  return out.reshape(b, num_slots, num_patches, d)


class Transfusion(nn.Module):
  """Transfusion model; `config` is the `config.model` ConfigDict (see tfusion/configlib.py)."""
  config: Any

  def setup(self):
    cfg = self.config
    img = cfg.image
    dtype = jnp.dtype(cfg.dtype)
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=dtype, name="embedding",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    if discrete_lib.is_discrete(cfg):
      discrete_lib.check_vocab(cfg)
    elif img.encoder == "linear":
      self.time_embedding = image_io.TimestepEmbedding(cfg.d_model, dtype=jnp.float32)
      self.image_in = image_io.LinearEncoder(cfg.d_model, img.patch_size, dtype=dtype)
      self.image_out = image_io.LinearDecoder(
          img.patch_size, img.latent_size, img.latent_size, img.latent_channels, dtype=dtype)
    elif img.encoder == "unet":
      self.time_embedding = image_io.TimestepEmbedding(cfg.d_model, dtype=jnp.float32)
      self.image_in = image_io.UNetEncoder(
          cfg.d_model, img.patch_size, tuple(img.unet_channels), img.unet_blocks_per_level)
      self.image_out = image_io.UNetDecoder(
          img.patch_size, img.latent_size, img.latent_size, img.latent_channels,
          tuple(img.unet_channels), img.unet_blocks_per_level)
    else:
      raise ValueError(f"config.model.image.encoder must be 'linear' or 'unet', got {img.encoder!r}")
    self.trunk = layers.Trunk(cfg)
    self.final_norm = layers.RMSNorm(cfg.norm_eps, dtype, "embed")
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, name="lm_head",
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))

  @property
  def num_patches(self):
    img = self.config.image
    return (img.latent_size // img.patch_size) ** 2

  def encode_images(self, noisy_latents, image_time):
    """[B, M, h, w, c] noisy latents and [B, M] times in [0, 1] -> (patch vectors [B, M, N, d], aux).

    `aux` = (time embedding [B, M, d], U-Net skips or None), needed by `predict_images`.
    """
    temb = self.time_embedding(image_time)
    vectors, skips = self.image_in(noisy_latents, temb)
    return vectors, (temb, skips)

  def embed(self, tokens, image_index, patch_vectors):
    """tokens int [B, L], image_index [B, L], patch vectors [B, M, N, d] -> inputs [B, L, d]."""
    x = place_patches(self.embedding(tokens), patch_vectors, image_index)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def run_trunk(self, x, positions, mask, cache=None, cache_index=None):
    """x [B, Lq, d], positions [B, Lq], mask -> (normed hidden [B, Lq, d], cache).

    `mask`: `attention.Intervals` of the rows (training, no cache), or a dense bool
    [B, Lq, Lk] (KV-cache decoding: `attention.query_rows_mask`, run by the dense kernel).
    """
    h, new_cache = self.trunk(x, positions, mask, cache, cache_index)
    return self.final_norm(h), new_cache

  def text_logits(self, h):
    """[B, L, d] -> float32 logits [B, L, V]."""
    if self.config.tie_embeddings:
      logits = self.embedding.attend(h)
    else:
      logits = self.lm_head(h)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def predict_images(self, h, image_index, aux):
    """Hidden states [B, L, d] -> per-slot prediction [B, M, h, w, c] (float32)."""
    temb, skips = aux
    per_slot = gather_patches(h, image_index, temb.shape[1], self.num_patches)
    return self.image_out(per_slot, temb, skips).astype(jnp.float32)

  def text_forward(self, tokens, positions, segment_ids):
    """Text-only rows (no image positions): int [B, L] x3 -> float32 logits [B, L, V].

    Documents packed in a row do not see each other (segment_ids); used by text evaluation.
    """
    x = nn.with_logical_constraint(self.embedding(tokens), ("batch", "length", "embed"))
    mask = attention_lib.intervals(segment_ids, jnp.full_like(segment_ids, -1))
    h, _ = self.run_trunk(x, positions, mask)
    return self.text_logits(h)

  def __call__(self, tokens, positions, segment_ids, image_index, noisy_latents, image_time):
    """Training forward pass over packed rows.

    Args:
      tokens, positions, segment_ids, image_index: int [B, L] per the batch contract.
      noisy_latents: [B, M, h, w, c] noised image latents.
      image_time: [B, M] diffusion time in [0, 1] of each slot.
    Returns:
      (text logits float32 [B, L, V], image prediction float32 [B, M, h, w, c]); discrete:
      (logits over text and image tokens, None), causal everywhere.
    """
    if discrete_lib.is_discrete(self.config):
      return self.text_forward(tokens, positions, segment_ids), None
    vectors, aux = self.encode_images(noisy_latents, image_time)
    x = self.embed(tokens, image_index, vectors)
    mask = attention_lib.intervals(segment_ids, image_index, intra_image=self.config.intra_image)
    h, _ = self.run_trunk(x, positions, mask)
    return self.text_logits(h), self.predict_images(h, image_index, aux)
