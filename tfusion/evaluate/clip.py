"""CLIP (OpenAI / open_clip ViT models) in Flax Linen, and the CLIP score.

Architecture as open_clip's `CLIP` with a `VisionTransformer` and the built-in text
transformer in their default settings: pre-LN residual blocks (LN -> multi-head attention with
a fused qkv projection -> residual, LN -> MLP(4x, GELU or QuickGELU) -> residual), LayerNorm
eps 1e-5. Image tower: patch conv without bias, class token prepended, learned positions,
ln_pre, transformer, ln_post, pooled at the class token ("tok") or the patch mean ("avg"),
then `proj`. Text tower: token + learned position embeddings, causal mask, ln_final, pooled
at the highest token id (<end_of_text>, "argmax"), then `text_projection`.

CLIP score (Hessel et al. 2021, as torchmetrics): 100 * max(cos(image, text), 0), averaged.

Weights file (`.npz`, written by `tfusion-convert-clip`): "config" holds the CLIPConfig as
JSON; every other key is "params/<module path>/<name>" (e.g.
"params/visual/transformer/resblocks_0/attn/in_proj/kernel"), kernels stored [in, out].
"""

import dataclasses
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# open_clip's OPENAI_DATASET_MEAN / STD (pixel normalization of all OpenAI and LAION ViTs).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Defaults are ViT-B-32 (OpenAI; quick_gelu=True for OpenAI's own weights)."""
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_ratio: float = 4.0
  vision_pool: str = "tok"  # "tok" (class token) or "avg" (mean of patch tokens)
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_ratio: float = 4.0
  quick_gelu: bool = False

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text):
    fields = json.loads(text)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown CLIPConfig fields: {', '.join(unknown)}")
    return cls(**fields)


def _layer_norm(name):
  # Two-pass variance, as torch.nn.LayerNorm.
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention (fused in_proj, out_proj). x: [B, L, D]; mask bool [L, L]."""
  num_heads: int

  @nn.compact
  def __call__(self, x, mask=None):
    b, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, name="in_proj")(x).reshape(b, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    if mask is not None:
      logits = jnp.where(mask, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
    return nn.Dense(width, name="out_proj")(out)


class MLP(nn.Module):
  hidden: int
  quick_gelu: bool

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.hidden, name="c_fc")(x)
    # QuickGELU is what OpenAI trained with; open_clip's non-OpenAI models use exact GELU.
    x = x * jax.nn.sigmoid(1.702 * x) if self.quick_gelu else jax.nn.gelu(x, approximate=False)
    return nn.Dense(width, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  num_heads: int
  mlp_ratio: float
  quick_gelu: bool

  @nn.compact
  def __call__(self, x, mask=None):
    x = x + MultiHeadAttention(self.num_heads, name="attn")(_layer_norm("ln_1")(x), mask)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + MLP(hidden, self.quick_gelu, name="mlp")(_layer_norm("ln_2")(x))


class Transformer(nn.Module):
  layers: int
  num_heads: int
  mlp_ratio: float
  quick_gelu: bool

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.num_heads, self.mlp_ratio, self.quick_gelu,
                                 name=f"resblocks_{i}")(x, mask)
    return x


class VisionTransformer(nn.Module):
  """images: float [B, S, S, 3], normalized with IMAGE_MEAN/STD -> [B, embed_dim]."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    p, width = c.patch_size, c.vision_width
    x = nn.Conv(width, (p, p), (p, p), padding="VALID", use_bias=False, name="conv1")(images)
    b = x.shape[0]
    x = x.reshape(b, -1, width)  # row-major patches, as torch's flatten of [W, gh, gw]
    grid = (c.image_size // p) ** 2
    scale = width ** -0.5
    cls = self.param("class_embedding", nn.initializers.normal(scale), (width,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale), (grid + 1, width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1) + pos
    x = _layer_norm("ln_pre")(x)
    x = Transformer(c.vision_layers, c.vision_heads, c.vision_mlp_ratio, c.quick_gelu,
                    name="transformer")(x)
    x = _layer_norm("ln_post")(x)
    pooled = x[:, 0] if c.vision_pool == "tok" else x[:, 1:].mean(axis=1)
    proj = self.param("proj", nn.initializers.normal(scale), (width, c.embed_dim))
    return pooled @ proj


class TextTransformer(nn.Module):
  """tokens: int [B, context_length] (see clip_tokenizer) -> [B, embed_dim]."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    length = tokens.shape[1]
    x = nn.Embed(c.vocab_size, c.text_width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (c.context_length, c.text_width))
    x = x + pos[:length]
    causal = jnp.tril(jnp.ones((length, length), bool))
    x = Transformer(c.text_layers, c.text_heads, c.text_mlp_ratio, c.quick_gelu,
                    name="transformer")(x, causal)
    x = _layer_norm("ln_final")(x)
    # Pool at <end_of_text>: the highest id in every tokenized row.
    pooled = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
    proj = self.param("text_projection", nn.initializers.normal(c.text_width ** -0.5),
                      (c.text_width, c.embed_dim))
    return pooled @ proj


class CLIP(nn.Module):
  """Both towers; params {"visual", "text", "logit_scale"}. Use encode_image / encode_text."""
  config: CLIPConfig

  def setup(self):
    self.visual = VisionTransformer(self.config)
    self.text = TextTransformer(self.config)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, tokens):
    return self.text(tokens)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


def param_shapes(config):
  """{"visual/conv1/kernel": shape, ...} of CLIP(config) (traced, nothing allocated)."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
  abstract = jax.eval_shape(lambda i, t: CLIP(config).init(jax.random.PRNGKey(0), i, t), images,
                            tokens)["params"]
  return {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract).items()}


def random_params(config, seed=0):
  """Random parameters of CLIP(config) for tests (norm scales 1, biases 0, weights N(0, 0.02)),
  drawn with numpy: compiling Flax's init costs more than the model's forward pass."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in param_shapes(config).items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
      flat[path] = np.ones(shape, np.float32)
    elif leaf == "bias":
      flat[path] = np.zeros(shape, np.float32)
    else:
      flat[path] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def save_weights(path, config, params):
  """Writes config + params in the documented .npz format."""
  flat = {"params/" + "/".join(k): np.asarray(v, np.float32)
          for k, v in flax.traverse_util.flatten_dict(params).items()}
  with open(path, "wb") as f:
    np.savez(f, config=np.array(config.to_json()), **flat)


def load_weights(path):
  """.npz -> (CLIPConfig, params), checked against the configured architecture.

  Raises FileNotFoundError (with the conversion command) or ValueError naming the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"CLIP weights file {path!r} does not exist; convert an OpenAI/open_clip checkpoint with "
        f"`tfusion-convert-clip --input CHECKPOINT --output {path}`")
  try:
    with np.load(path) as data:
      config = CLIPConfig.from_json(str(data["config"]))
      flat = {k[len("params/"):]: np.asarray(data[k], np.float32) for k in data.files
              if k.startswith("params/")}
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{path}: not a tfusion CLIP weights file ({e})") from None
  expected = param_shapes(config)
  problems = [f"missing {k}" for k in sorted(set(expected) - set(flat))]
  problems += [f"unexpected {k}" for k in sorted(set(flat) - set(expected))]
  problems += [f"{k}: file {flat[k].shape}, config {expected[k]}" for k in sorted(flat)
               if k in expected and flat[k].shape != expected[k]]
  if problems:
    raise ValueError(f"{path} does not match its CLIP config: " + "; ".join(problems[:10]))
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                              for k, v in flat.items()})
  return config, params


def preprocess(images, image_size):
  """Images -> the towers' input, as open_clip's eval transform (PIL bicubic resize of the
  shorter side, center crop, normalize).

  Args:
    images: uint8 [N, H, W, 3] or float in [0, 1].
  Returns:
    float32 [N, image_size, image_size, 3].
  """
  from PIL import Image
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
  if images.dtype != np.uint8:
    images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
  out = []
  for image in images:
    img = Image.fromarray(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != image_size:
      scaled_long = int(image_size * long / short)
      size = (image_size, scaled_long) if w <= h else (scaled_long, image_size)
      img = img.resize(size, Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - image_size) / 2.0)), int(round((h - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    out.append(np.asarray(img, np.float32) / 255.0)
  return (np.stack(out) - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)


def clip_score_per_pair(image_features, text_features):
  """100 * max(cos, 0) for matched rows of [N, E] features -> float [N]."""
  a = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
  b = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
  return 100.0 * jnp.maximum(jnp.sum(a * b, axis=-1), 0.0)


class CLIPScorer:
  """CLIP score of (image, caption) pairs with weights from a file.

  `scorer(images, captions)` -> float: images uint8 [N, H, W, 3] (or float in [0, 1]),
  captions N strings; `scorer.per_pair(...)` -> float32 [N].
  """

  def __init__(self, weights_path, tokenizer=None, batch_size=64):
    from tfusion.evaluate import clip_tokenizer
    self.config, self.params = load_weights(weights_path)
    self.tokenizer = tokenizer or clip_tokenizer.CLIPTokenizer(
        context_length=self.config.context_length)
    self.batch_size = batch_size
    model = CLIP(self.config)
    self._score = jax.jit(lambda p, im, tok: clip_score_per_pair(
        model.apply({"params": p}, im, method=CLIP.encode_image),
        model.apply({"params": p}, tok, method=CLIP.encode_text)))

  def per_pair(self, images, captions):
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions")
    out = []
    for start in range(0, len(captions), self.batch_size):
      pixels = preprocess(images[start:start + self.batch_size], self.config.image_size)
      tokens = self.tokenizer(list(captions[start:start + self.batch_size]),
                              self.config.context_length)
      pad = self.batch_size - len(tokens)  # fixed batch shape: one compile
      pixels = np.concatenate([pixels, np.zeros((pad, *pixels.shape[1:]), np.float32)])
      tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
      out.append(np.asarray(self._score(self.params, pixels, tokens))[:self.batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def __call__(self, images, captions):
    return float(np.mean(self.per_pair(images, captions)))
