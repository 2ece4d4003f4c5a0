"""Discrete image tokens (the Chameleon baseline, `config.model.image.representation="discrete"`).

An image is the text-like sequence `<boi> c_1 ... c_n <eoi>`: its VQ-VAE codes (tfusion/vae/vq.py)
in row-major order, n = latent_size^2 (config.model.image.latent_size is the side of the code
grid), each mapped into the model's vocabulary. The mapping, here and nowhere else:

    token = image_token_offset + code,   image_token_offset = vocab_size - codebook_size

with vocab_size = config.model.vocab_size and codebook_size = config.model.image.codebook_size:
the codes take the LAST codebook_size ids of the vocabulary. Text (the tokenizer's ids, <boi>
and <eoi> included) takes ids [0, tokenizer vocabulary); ids between the two (vocabulary
padding) are never produced. The model and the loss need only the config to tell image tokens
from text (no tokenizer), and a padded text vocabulary keeps its padding.

In discrete mode there are no image slots, no diffusion and no bidirectional blocks: attention
is causal throughout and the next-token loss covers text and image tokens alike (image-token
targets are reported separately). `check_vocab` is the config check both the data pipeline and
generation run.
"""

import numpy as np

REPRESENTATIONS = ("continuous", "discrete")


def representation(model_config):
  """config.model.image.representation, checked ("continuous" when the key is absent)."""
  img = model_config.get("image") if hasattr(model_config, "get") else None
  rep = (img.get("representation", "continuous") if img is not None else "continuous")
  if rep not in REPRESENTATIONS:
    raise ValueError(f"config.model.image.representation must be one of {REPRESENTATIONS}, "
                     f"got {rep!r}")
  return rep


def is_discrete(model_config):
  return representation(model_config) == "discrete"


def codebook_size(model_config):
  return int(model_config.image.codebook_size)


def image_token_offset(model_config):
  """The id of code 0 (see the module doc)."""
  return int(model_config.vocab_size) - codebook_size(model_config)


def num_image_tokens(model_config):
  """Codes per image: the code grid is latent_size x latent_size."""
  return int(model_config.image.latent_size) ** 2


def code_shape(model_config):
  s = int(model_config.image.latent_size)
  return (s, s)


def codes_to_tokens(codes, model_config):
  """int codes [..., h, w] -> token ids [..., h * w] (row-major)."""
  codes = np.asarray(codes)
  return (codes.reshape(codes.shape[:-2] + (-1,)).astype(np.int64)
          + image_token_offset(model_config)).astype(np.int32)


def tokens_to_codes(tokens, model_config):
  """token ids [..., n] -> codes [..., h, w]; ids outside the image range are an error."""
  tokens = np.asarray(tokens)
  offset, k = image_token_offset(model_config), codebook_size(model_config)
  bad = (tokens < offset) | (tokens >= offset + k)
  if bad.any():
    raise ValueError(f"token {int(tokens[bad][0])} is not an image token (image tokens are "
                     f"[{offset}, {offset + k}): config.model.vocab_size - "
                     "config.model.image.codebook_size onwards)")
  return (tokens - offset).reshape(tokens.shape[:-1] + code_shape(model_config)).astype(np.int32)


def check_vocab(model_config, text_vocab_size=None, *, what="the tokenizer"):
  """Raises ValueError (naming the config keys) when the codes do not fit beside the text."""
  k = codebook_size(model_config)
  v = int(model_config.vocab_size)
  if k <= 0:
    raise ValueError(f"config.model.image.codebook_size={k}: discrete images need the VQ "
                     "codebook size (num_vq_embeddings of the VQ-VAE)")
  text_vocab_size = 1 if text_vocab_size is None else text_vocab_size
  if v - k < text_vocab_size:
    raise ValueError(
        f"config.model.vocab_size={v} has no room for config.model.image.codebook_size={k} "
        f"image tokens beside the {text_vocab_size} text ids of {what} (<boi>/<eoi> included): "
        f"image tokens are the last codebook_size ids, so config.model.vocab_size must be at "
        f"least {text_vocab_size + k}")


def check_codebook(model_config, num_codes, where="the VQ-VAE"):
  """A VQ-VAE (or records) whose codebook size differs from the config's is an error."""
  k = codebook_size(model_config)
  if int(num_codes) != k:
    raise ValueError(f"{where} has a codebook of {int(num_codes)} codes but "
                     f"config.model.image.codebook_size={k} (with config.model.vocab_size="
                     f"{int(model_config.vocab_size)}): set config.model.image.codebook_size="
                     f"{int(num_codes)} and config.model.vocab_size >= text vocabulary + "
                     f"{int(num_codes)}")
