"""The paper's model sizes with its optimizer settings (PAPER.md).

Usage: --config experiments/configs/paper.py:0.37B        (linear 2x2 patches)
       --config experiments/configs/paper.py:0.76B,unet   (U-Net encode/decode layers)
Sizes: 0.16B, 0.37B, 0.76B, 1.4B, 7B.
"""

from tfusion import configlib


def get_config(arg="0.16B"):
  size, _, encoder = (arg or "0.16B").partition(",")
  config = configlib.base_config()
  config.model = configlib.model_config(size)
  config.model.image.encoder = encoder or "linear"
  return config
