"""Pictures out: latents or VQ codes -> pixels (the image codec), PNG files, a labelled grid."""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tfusion.vae import images as images_lib


def decode_latents(vae, latents, batch_size=16):
  """Normalized latents [N, h, w, c] -> uint8 images [N, H, W, 3] through `vae.decode`."""
  latents = np.asarray(latents, np.float32)
  if latents.shape[-1] != vae.latent_channels:
    raise ValueError(f"latents have {latents.shape[-1]} channels; the VAE expects "
                     f"{vae.latent_channels} (config.model.image.latent_channels vs the VAE's)")
  out = [np.asarray(vae.decode(latents[i:i + batch_size]))
         for i in range(0, len(latents), batch_size)]
  return images_lib.to_uint8(np.concatenate(out))


class ImageCodec:
  """Pixels <-> what the model reads and writes as images, by config.model.image.representation:
  normalized latents [N, h, w, c] through the VAE (continuous) or VQ codes int [N, h, w] through
  the VQ-VAE (discrete). `path`: the VAE or VQ-VAE directory."""

  def __init__(self, path, config):
    from tfusion import discrete as discrete_lib
    self.path, self.discrete = path, discrete_lib.is_discrete(config.model)
    if self.discrete:
      from tfusion.vae import vq as vq_lib
      self.model = vq_lib.load_vq(path)
      discrete_lib.check_codebook(config.model, self.model.num_codes,
                                  f"the VQ-VAE {path} (config.vae.path / --vae)")
    else:
      from tfusion import vae as vae_lib
      self.model = vae_lib.load_vae(path)
      if self.model.latent_channels != config.model.image.latent_channels:
        raise ValueError(f"VAE {path} has {self.model.latent_channels} latent channels; the "
                         "model expects config.model.image.latent_channels="
                         f"{config.model.image.latent_channels}")

  @property
  def downsample_factor(self):
    return self.model.downsample_factor

  def encode(self, pixels):
    """float [N, H, W, 3] in [-1, 1] -> latents [N, h, w, c] (the mean) or codes [N, h, w]."""
    if self.discrete:
      return np.asarray(self.model.encode_codes(pixels))
    return np.asarray(self.model.encode(pixels))

  def decode(self, images, batch_size=16):
    """latents [N, h, w, c] or codes [N, h, w] -> uint8 images [N, H, W, 3]."""
    if not self.discrete:
      return decode_latents(self.model, images, batch_size)
    codes = np.asarray(images, np.int32)
    out = [np.asarray(self.model.decode_codes(codes[i:i + batch_size], "generated codes"))
           for i in range(0, len(codes), batch_size)]
    return images_lib.to_uint8(np.concatenate(out))


def save_png(path, image):
  """uint8 [H, W, 3] -> PNG file (directories created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def label_font(size=12):
  """A readable label font: Pillow's bundled FreeType font when available, else its bitmap."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # Pillow < 10.1 or built without FreeType
    return ImageFont.load_default()


def _fit(draw, text, font, width):
  """`text`, cut with an ellipsis to fit `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def labelled_grid(images, labels, *, min_size=64, pad=4):
  """A grid with one labelled row per prompt.

  Args:
    images: uint8 [R, C, H, W, 3] (R prompts x C samples).
    labels: R strings, written above their rows.
    min_size: small images are scaled up (nearest) to at least this many pixels.
  Returns:
    a PIL image.
  """
  images = np.asarray(images, np.uint8)
  rows, cols, h, w, _ = images.shape
  if len(labels) != rows:
    raise ValueError(f"{len(labels)} labels for {rows} rows of images")
  scale = max(1, -(-min_size // max(h, w)))
  h, w = h * scale, w * scale
  font = label_font()
  label_h = 15
  width = max(cols * (w + pad) + pad, 160)
  height = rows * (label_h + h + pad) + pad
  grid = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for r in range(rows):
    top = pad + r * (label_h + h + pad)
    draw.text((pad, top), _fit(draw, labels[r], font, width - 2 * pad), fill=(0, 0, 0), font=font)
    for c in range(cols):
      tile = Image.fromarray(images[r, c]).resize((w, h), Image.NEAREST)
      grid.paste(tile, (pad + c * (w + pad), top + label_h))
  return grid
