"""A demo-scale scaling sweep on CPU: 2 attention families x 4 sizes x 2 token budgets.

  tfusion-sweep experiments/sweeps/demo.py --dir S --run      # 20-40 minutes on 2 cores

The demo's data and model family (tfusion/demo/config.py: digits captioned "a handwritten digit
seven" plus pydoc text, its SentencePiece tokenizer and 8x8x4-latent VAE, rectified flow),
prepared inside S by the runner (S/data, S/vae; a few minutes, once). Families: the paper's
bidirectional attention inside images vs. causal attention inside images (its ablation).
Sizes 0.10M..1.17M parameters (2-4 layers, width 32-128); budgets 300 and 600 steps of 16 rows
x 128 positions. Each checkpoint evaluated (the middle and the final one) gets the held-out
loss suite (`loss/image`: diffusion loss on the 297 held-out digits, the parity plot's metric;
`loss/text`: caption loss) and text perplexity on held-out pydoc pages (`ppl/heldout_text`).

Measured on the shared 2-core CPU (demo data, 16 x 128 rows, one run at a time; step times of
a 40-step run, ranges over two sessions: the machine's speed varied about 2x):
  size  shape                  params  train step     run of 600 steps + 2 evals
  s1    2 x 32,  2 heads        0.10M  0.06-0.08 s    ~1-1.3 min
  s2    2 x 64,  4 heads        0.26M  0.08-0.14 s    ~1.3-1.9 min
  s3    3 x 96,  4 heads        0.60M  0.13-0.27 s    ~1.8-3.2 min
  s4    4 x 128, 4 heads        1.17M  0.22-0.42 s    ~2.6-4.6 min
Each run spends ~10 s in setup and compiling and ~7 s per evaluated checkpoint (loss + ppl).
Through `--run` (tfusion-sweep itself): bidirectional-s1-0.6M trained in 57 s and evaluated in
14 s; bidirectional-s4-1.2M took 422 s + 16 s while other jobs loaded the machine (0.7 s/step).
Total: 900 steps per size and family, ~7-14 min of steps + ~2.5 min overhead per family, so
~20-36 minutes for the 16 runs plus ~2.5 minutes preparing the data once (VAE: 400 steps).
"""

import ml_collections

from tfusion.scaling import spec


def get_sweep():
  rows, seq_len = 16, 128
  positions = rows * seq_len  # tokens per step
  # allow_dotted_keys: overrides are keyed by dotted config keys.
  return ml_collections.ConfigDict({
      "name": "demo",
      "description": "demo-scale Transfusion scaling: bidirectional vs causal inside images",
      "base_config": "demo",  # tfusion/demo/config.py; the runner prepares S/data and S/vae
      "base_overrides": {
          # Half the demo's rows per step: twice the updates for the same compute, which is
          # what these small models need (the demo's --quick finding).
          "data.batch_size": rows, "data.seq_len": seq_len,
          "optim.lr": 1e-3, "optim.end_lr": 1e-4,
          "train.log_every": 10,  # the registry's text/image counts average these steps
          "eval.loss_rows": 128,  # ~4 held-out pairs per row: each of the 297 scored ~twice
      },
      "families": {
          "bidirectional": {"model.intra_image": "bidirectional"},
          "causal_image": {"model.intra_image": "causal"},
      },
      "sizes": {
          "s1": spec.model_size(32, 2, 2),
          "s2": spec.model_size(64, 2, 4),
          "s3": spec.model_size(96, 3, 4),
          "s4": spec.model_size(128, 4, 4),  # the demo's own model
      },
      "budgets": {
          "0.6M": {"tokens": 300 * positions},
          "1.2M": {"tokens": 600 * positions},
      },
      "schedule": {
          "warmup_fraction": 0.05, "warmup_min": 10, "warmup_max": 4000,
          "evals": 2,  # the middle and the final checkpoint
          "checkpoint_every": 0,
      },
      "eval_suites": "loss,ppl",
  }, allow_dotted_keys=True)
