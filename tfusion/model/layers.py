"""Llama-style transformer layers: RMSNorm, RoPE, attention with a functional KV cache, SwiGLU.

Every parameter carries logical axis names (see tfusion/sharding.py for the table that maps
them to mesh axes); activations are constrained with the same names.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tfusion.model import attention as attention_lib
from tfusion.model import remat as remat_lib

Dtype = Any
_DENSE_INIT = nn.initializers.normal(stddev=0.02)


def _param(init, names):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned per-feature scale (no bias). x: [..., d]."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _param(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale).astype(self.dtype)


def apply_rope(x, positions, theta):
  """Rotary position embedding (rotate-half convention, as Llama).

  Args:
    x: [B, L, H, D] queries or keys, D even.
    positions: int [B, L], position of each token inside its document.
    theta: base wavelength.
  Returns:
    [B, L, H, D] in x's dtype.
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Projection(nn.Module):
  """A bias-free linear map as one einsum over a kernel of shape `shape` (logical `names`).

  Used instead of nn.DenseGeneral, whose initializer sees a flattened kernel shape and so
  cannot carry one logical name per kernel axis.
  """
  shape: tuple
  names: tuple
  equation: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _param(_DENSE_INIT, self.names), self.shape)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class Attention(nn.Module):
  """Multi-head (optionally grouped-query) self-attention without biases.

  With `cache=None` the queries attend to the keys of the same call (training). With a
  cache {"k", "v": [B, Lc, Hkv, D]} the new keys/values are written at `cache_index` and the
  queries attend to the whole cache buffer; the mask is then [B, Lq, Lc]. Without a cache
  `mask` is an `attention.Intervals` (any `implementation`) or a dense bool [B, L, L].
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  qk_norm: bool = False
  norm_eps: float = 1e-5
  implementation: str = "dense"
  block_size: int = attention_lib.DEFAULT_BLOCK  # query/key block of the blocked kernels
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    d_model = x.shape[-1]
    proj = lambda heads, names, name: Projection(
        (d_model, heads, self.head_dim), names, "bld,dhk->blhk", self.dtype, name=name)(x)
    # Names for the remat policies (tfusion/model/remat.py); identity outside jax.checkpoint.
    name = remat_lib.checkpoint_name
    q = name(proj(self.num_heads, ("embed", "heads", "head_dim"), "q"), "q_proj")
    k = name(proj(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "k"), "k_proj")
    v = name(proj(self.num_kv_heads, ("embed", "kv_heads", "head_dim"), "v"), "v_proj")
    if self.qk_norm:
      q = RMSNorm(self.norm_eps, self.dtype, "head_dim", name="q_norm")(q)
      k = RMSNorm(self.norm_eps, self.dtype, "head_dim", name="k_norm")(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    new_cache = None
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    out = attention_lib.dot_product_attention(q, k, v, mask, implementation=self.implementation,
                                              block_q=self.block_size, block_k=self.block_size)
    out = name(out, remat_lib.ATTN_CONTEXT)
    out = Projection((self.num_heads, self.head_dim, d_model), ("heads", "head_dim", "embed"),
                     "blhk,hkd->bld", self.dtype, name="o")(out)
    return out, new_cache


class SwiGLU(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x)). x: [..., d] -> [..., d]."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d_model = x.shape[-1]
    dense = lambda feats, names, name: nn.Dense(
        feats, use_bias=False, dtype=self.dtype, name=name, kernel_init=_param(_DENSE_INIT, names))
    gate = dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
    up = dense(self.hidden_dim, ("embed", "mlp"), "up")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(d_model, ("mlp", "embed"), "down")(hidden)


class Block(nn.Module):
  """Pre-norm decoder block. Signature fits nn.scan: (x, *broadcast, layer_cache) -> (x, cache)."""
  config: Any  # the model ConfigDict

  @nn.compact
  def __call__(self, x, positions, mask, cache_index, layer_cache):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    attn_out, new_cache = Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        implementation=cfg.attention_impl, dtype=dtype, name="attn",
        block_size=cfg.get("attention_block", attention_lib.DEFAULT_BLOCK),
    )(RMSNorm(cfg.norm_eps, dtype, "embed", name="attn_norm")(x), positions, mask,
      layer_cache, cache_index)
    x = x + attn_out
    x = x + SwiGLU(cfg.mlp_dim, dtype, name="mlp")(RMSNorm(cfg.norm_eps, dtype, "embed", name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class Trunk(nn.Module):
  """`num_layers` blocks scanned over a leading 'layers' parameter axis.

  __call__(x [B, L, d], positions [B, L], mask (Intervals, or bool [B, L, Lk]), cache, cache_index)
    -> (h [B, L, d], new cache or None). The cache is {"k", "v": [layers, B, Lc, Hkv, D]}.
  """
  config: Any

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    cfg = self.config
    policy = remat_lib.policy(cfg.remat)
    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, name="layers")(x, positions, mask, cache_index, cache)
