"""The paper's scaling grid (PAPER.md): 5 sizes x 0.5T tokens, Transfusion and causal-image.

  tfusion-sweep experiments/sweeps/paper.py --dir S                      # the plan, FLOPs
  tfusion-sweep experiments/sweeps/paper.py --dir S --print-launch slurm > sweep.sbatch

A launch plan for a cluster: the sizes are experiments/configs/paper.py's (0.16B..7B, linear
2x2 patches, Llama 2's tokenizer, DDPM), trained like the paper: 2M-token batches (512 rows of
4096) for 250k steps = 0.5T tokens, 1:1 text tokens to image patches, lr 3e-4, 4000 warmup
steps, cosine to 1.5e-5. Chameleon (discrete image tokens) is not a config of this codebase,
so the second family is the paper's causal-inside-images ablation. Every 50k steps a
checkpoint is kept and evaluated (the curves of metric vs FLOPs along each run).

DATA below is a placeholder: point it at your records, tokenizer, VAE and eval files
(tfusion-precompute-latents, tfusion-make-text-records, tfusion-convert-*), and check each
size fits your mesh first (tfusion-aot --config experiments/configs/paper.py:7B ...).
"""

import os

import ml_collections

from tfusion import configlib

DATA = "/shared/tfusion-data"  # placeholder: edit to your cluster's paths


def _size(name):
  s = configlib.PAPER_SIZES[name]
  return {"model.num_layers": s["num_layers"], "model.d_model": s["d_model"],
          "model.num_heads": s["num_heads"], "model.num_kv_heads": s["num_heads"],
          "model.head_dim": s["head_dim"], "model.mlp_dim": configlib.llama_mlp_dim(s["d_model"])}


def get_sweep():
  rows, seq_len, steps = 512, 4096, 250_000  # 2M-token batches x 250k steps (PAPER.md)
  path = lambda *parts: os.path.join(DATA, *parts)
  return ml_collections.ConfigDict({
      "name": "paper",
      "description": "Transfusion scaling grid of the paper, 0.16B-7B on 0.5T tokens",
      "base_config": "experiments/configs/paper.py:0.16B",  # sizes override the shape below
      "base_overrides": {
          "data.source": "grain", "data.batch_size": rows, "data.seq_len": seq_len,
          "data.max_images": 16,  # 1:1 at 256 patches per image: ~8 images per row
          "data.text_weight": 1.0, "data.image_caption_weight": 1.0,
          "data.interleaved_weight": 0.0,
          "data.tokenizer": path("llama2", "tokenizer.model"),
          "data.text": path("text"), "data.image_caption": path("image_caption"),
          "vae.path": path("vae"),
          "mesh.data": -1, "mesh.fsdp": 8,  # FSDP inside an 8-GPU node, data across nodes
          "train.preempted_exit_code": 75,
          "eval.prompts": path("eval", "coco_val_prompts.jsonl"),
          "eval.fid_weights": path("eval", "inception.npz"),
          "eval.fid_reference": path("eval", "coco_val_images"),
          "eval.clip_weights": path("eval", "clip.npz"),
          "eval.num_samples": 30_000,
          "eval.caption_records": path("eval", "coco_karpathy_test"),
          "eval.ppl_files": ",".join([path("eval", "wikipedia.jsonl"), path("eval", "c4.jsonl")]),
          "eval.ppl_max_tokens": 20_000_000,
          "eval.mc_tasks": path("eval", "mc", "hellaswag.jsonl"),
          "eval.loss_text": path("heldout", "text"),
          "eval.loss_image_caption": path("heldout", "image_caption"),
      },
      "families": {
          "transfusion": {"model.intra_image": "bidirectional"},
          "causal_image": {"model.intra_image": "causal"},
      },
      "sizes": {name: _size(name) for name in configlib.PAPER_SIZES},
      "budgets": {"0.5T": {"tokens": steps * rows * seq_len}},
      "schedule": {
          "warmup_fraction": 4000 / steps, "warmup_min": 100, "warmup_max": 4000,
          "evals": 5,  # every 50k steps
          "checkpoint_every": 1000,  # saves for preemption; only every 50k-th is kept
      },
      "eval_suites": "loss,ppl,mc,caption,fid,clip",
  }, allow_dotted_keys=True)
