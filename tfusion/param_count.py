"""Parameter counts of model configs, without allocating them (jax.eval_shape).

Usage: tfusion-param-count [--config experiments/configs/paper.py:0.37B]
With no --config it prints the paper's five sizes, linear and U-Net.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from tfusion import configlib
from tfusion.model import transfusion


def abstract_params(model_config):
  """Parameter shapes (ShapeDtypeStructs, logical metadata stripped) of a model config."""
  model = transfusion.Transfusion(model_config)
  img = model_config.image
  n = (img.latent_size // img.patch_size) ** 2
  length = n + 4
  tokens = jnp.zeros((1, length), jnp.int32)
  index = jnp.asarray(np.r_[-1, np.zeros(n), -1, -1, -1].astype(np.int32)[None])
  latents = jnp.zeros((1, 1, img.latent_size, img.latent_size, img.latent_channels))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens, tokens + 1, index,
                          latents, jnp.zeros((1, 1)))
  return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, shapes,
                      is_leaf=lambda x: hasattr(x, "value"))


def count(model_config):
  """Returns {"total", "image_layers", "embeddings"} parameter counts."""
  params = abstract_params(model_config)["params"]
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  image = size({k: v for k, v in params.items() if k in ("image_in", "image_out", "time_embedding")})
  embeddings = size({k: v for k, v in params.items() if k in ("embedding", "lm_head")})
  return {"total": size(params), "image_layers": image, "embeddings": embeddings}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="config file[:arg]; default: the paper's five sizes")
  args = parser.parse_args(argv)
  if args.config:
    rows = [(args.config, configlib.load_config_file(args.config).model)]
  else:
    rows = []
    for size in configlib.PAPER_SIZES:
      for encoder in ("linear", "unet"):
        cfg = configlib.model_config(size)
        cfg.image.encoder = encoder
        rows.append((f"{size} {encoder}", cfg))
  print(f"{'model':<14}{'total':>12}{'trunk+emb':>12}{'image layers':>14}")
  for name, cfg in rows:
    c = count(cfg)
    print(f"{name:<14}{c['total'] / 1e9:>11.3f}B{(c['total'] - c['image_layers']) / 1e9:>11.3f}B"
          f"{c['image_layers'] / 1e6:>13.1f}M")


if __name__ == "__main__":
  main()
