"""Generation speed: the prefix KV cache vs recomputing the whole sequence at every step.

  python benchmarks/generate_speed.py [--prompt_lens 32,1024 --steps 50 --new_tokens 128]

Image: one image of 256 patches (32x32 latent, 2x2 patches) after a prompt of P tokens,
`--steps` DDIM steps, no guidance. "cached" = prefill the prompt once + each step runs the
256 image positions against the cache; "full" = each step runs the training forward pass over
the whole sequence (<bos> prompt <boi> patches). Text: greedy decoding of `--new_tokens`
tokens after a 32-token prompt, with the KV cache (one position per step) and without (the
whole buffer every step). Tiny model (experiments/configs/tiny.py sizes), random weights;
times exclude compilation (each path runs once to compile, then is timed once).
"""

import argparse
import functools
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tfusion import configlib, train_state
from tfusion.generate import engine, reference

SPECIAL = engine.SpecialTokens(bos=1, eos=2, boi=3, eoi=4)


def make_config(max_len):
  config = configlib.base_config()  # tiny model: 2 layers, d_model 64
  config.model.image.update(latent_size=32, latent_channels=4, patch_size=2)  # 256 patches
  config.model.max_len = max_len
  return config


def random_params(config, seed=0):
  model = train_state.build_model(config)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *train_state.dummy_inputs(config.model)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.05),
                      shapes)


def timed(fn):
  """Runs fn twice (compile, then measure). Returns (seconds of the second run, result)."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def bench_image(prompt_len, steps):
  n = 256
  config = make_config(prompt_len + 3 + n)
  params = random_params(config)
  gen = engine.Generator(config, params, SPECIAL)
  prompt = [10 + i % 400 for i in range(prompt_len)]  # ids inside the 512-token vocabulary
  keys = engine.sample_keys(0, 1)

  def cached():
    ctx, _ = gen.prefill([[SPECIAL.bos, *prompt, SPECIAL.boi]], reserve=n + 1)
    return gen.sample_image(ctx, keys, sampler="ddim", steps=steps)

  t_prefill, _ = timed(lambda: gen.prefill([[SPECIAL.bos, *prompt, SPECIAL.boi]], reserve=n + 1))
  t_cached, x_cached = timed(cached)

  blank = (np.zeros(gen.latent_shape, np.float32), 0.0)
  rows = reference.layout_rows([[SPECIAL.bos, *prompt, SPECIAL.boi, blank]], prompt_len + 2 + n,
                               n, gen.latent_shape)
  rows = {k: jnp.asarray(v) for k, v in rows.items()}
  full = jax.jit(functools.partial(reference.sample_full_sequence, gen.model),
                 static_argnames=("objective", "sampler", "guided"))
  times = jnp.asarray(gen.objective.sampling_times(steps))
  t_full, x_full = timed(lambda: full(params, rows, rows, keys, times, jnp.float32(1.0),
                                      objective=gen.objective, sampler="ddim", guided=False))
  err = float(jnp.abs(x_cached - x_full).max() / jnp.abs(x_full).max())
  return dict(prompt=prompt_len, cached=t_cached, prefill=t_prefill, full=t_full,
              speedup=t_full / t_cached, rel_diff=err)


def bench_text(prompt_len, new_tokens, batch):
  config = make_config(prompt_len + 1 + new_tokens)
  config.model.image.update(latent_size=8)  # image layers unused here
  params = random_params(config)
  gen = engine.Generator(config, params, SPECIAL)
  prompts = [[10 + (b + i) % 400 for i in range(prompt_len)] for b in range(batch)]
  keys = engine.sample_keys(0, batch)

  def cached():
    ctx, logits = gen.prefill([[SPECIAL.bos, *p] for p in prompts], pad_multiple=1)
    result, _, _ = gen.decode_text(ctx, logits, keys, max_new_tokens=new_tokens, stop_ids=[-1])
    return result.tokens

  t_cached, tokens_cached = timed(cached)
  rows = reference.layout_rows([[SPECIAL.bos, *p] for p in prompts], prompt_len + 1 + new_tokens,
                               gen.num_patches, gen.latent_shape)
  rows = {k: jnp.asarray(v) for k, v in rows.items()}
  full = jax.jit(functools.partial(reference.greedy_decode_full_sequence, gen.model),
                 static_argnums=2)
  t_full, (tokens_full, _) = timed(lambda: full(params, rows, new_tokens))
  return dict(prompt=prompt_len, batch=batch, new=new_tokens,
              cached_tps=batch * new_tokens / t_cached, full_tps=batch * new_tokens / t_full,
              same_tokens=bool((np.asarray(tokens_cached) == np.asarray(tokens_full)).all()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt_lens", default="32,1024")
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--text_prompt", type=int, default=32)
  parser.add_argument("--batch", type=int, default=1)
  args = parser.parse_args()
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{jax.devices()[0].device_kind}; jax {jax.__version__}")
  print(f"image: 1 image, 256 patches, {args.steps} DDIM steps, tiny model")
  for p in (int(x) for x in args.prompt_lens.split(",")):
    r = bench_image(p, args.steps)
    print(f"  prompt {p:5d}: prefix cache {r['cached']:.3f}s (prefill {r['prefill']:.3f}s) | "
          f"whole sequence every step {r['full']:.3f}s | speedup {r['speedup']:.2f}x | "
          f"max rel diff {r['rel_diff']:.1e}", flush=True)
  r = bench_text(args.text_prompt, args.new_tokens, args.batch)
  print(f"text: {r['new']} greedy tokens after {r['prompt']} prompt tokens, batch {r['batch']}: "
        f"KV cache {r['cached_tps']:.0f} tokens/s | no cache {r['full_tps']:.0f} tokens/s | "
        f"speedup {r['cached_tps'] / r['full_tps']:.2f}x | same tokens: {r['same_tokens']}")


if __name__ == "__main__":
  main()
