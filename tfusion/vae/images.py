"""Images in, VAE inputs out: RGB float [-1, 1] at a square resolution, center-cropped.

Accepted: files PIL can read (any mode: grayscale, 16-bit grayscale, palette, RGBA composited
on white, CMYK; EXIF rotation applied) and arrays (uint8, uint16, bool, or float in [0, 1];
[H, W], [H, W, 1], [H, W, 3] or [H, W, 4]).
Anything else is an error naming the file or the array index.
"""

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class BadImageError(ValueError):
  """An image that cannot be converted (names its file or index)."""


def list_images(folder):
  """Sorted image files directly inside `folder` (error if none)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist")
  files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise FileNotFoundError(f"image folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return files


def _center_crop_resize(img, size):
  w, h = img.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  img = img.crop((left, top, left + side, top + side))
  if side != size:
    img = img.resize((size, size), Image.BICUBIC)
  return img


def load_image(path, size):
  """File -> float32 [size, size, 3] in [-1, 1]."""
  try:
    with Image.open(path) as img:
      img.load()
      img = ImageOps.exif_transpose(img)  # camera photos: rotate as the viewer shows them
      if img.mode.startswith("I;16") or img.mode == "I":
        # convert("RGB") would clip 16-bit values at 255 (a white image): rescale instead.
        gray = np.asarray(img).astype(np.float64)
        peak = 65535 if img.mode.startswith("I;16") or gray.max() > 255 else 255
        img = Image.fromarray(np.round(gray / peak * 255).clip(0, 255).astype(np.uint8))
      elif img.mode == "F":
        return array_to_model_input(np.asarray(img), size, source=path)
      if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
      img = _center_crop_resize(img.convert("RGB"), size)
  except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadImageError(f"{path}: cannot read as an image ({e})") from None
  return np.asarray(img, np.float32) / 127.5 - 1.0


def array_to_model_input(array, size, source="array"):
  """One image array -> float32 [size, size, 3] in [-1, 1] (see module docstring)."""
  a = np.asarray(array)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
    raise BadImageError(f"{source}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got "
                        f"shape {a.shape}")
  if a.dtype == np.uint8:
    pixels = a
  elif a.dtype == np.uint16:
    pixels = np.round(a / 257.0).astype(np.uint8)
  elif a.dtype == bool:
    pixels = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.floating):
    if not np.isfinite(a).all() or a.min() < -1e-3 or a.max() > 1 + 1e-3:
      raise BadImageError(f"{source}: float images must be finite and in [0, 1], got range "
                          f"[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]")
    pixels = np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)
  else:
    raise BadImageError(f"{source}: dtype {a.dtype} is not supported (uint8, uint16, bool, or "
                        f"float in [0, 1])")
  mode = {2: "L", 3: "RGB"}[a.ndim] if a.ndim == 2 or a.shape[-1] == 3 else "RGBA"
  img = Image.fromarray(pixels, mode=mode)
  if mode == "RGBA":
    img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
  img = _center_crop_resize(img.convert("RGB"), size)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def load_folder(folder, size):
  """All images of a folder -> (float32 [N, size, size, 3], file names)."""
  files = list_images(folder)
  return np.stack([load_image(f, size) for f in files]), files


def to_uint8(images):
  """[-1, 1] floats -> uint8 [0, 255] (for saving pictures)."""
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)
