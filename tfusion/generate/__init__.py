"""Generation: text decoding with a KV cache, image sampling with a cached prefix and
classifier-free guidance, interleaved text and images, captioning, and `tfusion-generate`.

  context.py    the KV cache + row layout; the model run on a chunk of new slots
  text.py       greedy / temperature / top-p decoding loop
  image.py      samplers (ddpm, ddim, euler, heun), guidance, the denoising loop
  engine.py     `Generator`: host-side driver, input checks, tasks
  reference.py  the same without a cache (whole sequence every step), for tests/benchmarks
  output.py     latents -> PNGs and a labelled grid
  cli.py        the console script
"""

from tfusion.generate.engine import (  # noqa: F401 (public API)
    Generator, SpecialTokens, TextResult, check_image_layers, sample_keys)
from tfusion.generate.image import DEFAULT_SAMPLER, SAMPLERS, resolve_sampler  # noqa: F401
