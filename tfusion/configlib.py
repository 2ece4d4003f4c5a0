"""Config as code: every key with its default and meaning, and the paper's model sizes.

Config files in experiments/configs/ start from `base_config()` and change what they need;
command lines override single keys with `--config.key=value`. Unknown keys are errors.
"""

import importlib.util
import os

import ml_collections

from tfusion.data.config import data_config

# Paper sizes (PAPER.md): layers, d_model, heads, head_dim. FFN width follows Llama:
# 8/3 * d rounded up to a multiple of 256.
PAPER_SIZES = {
    "0.16B": dict(num_layers=16, d_model=768, num_heads=12, head_dim=64),
    "0.37B": dict(num_layers=24, d_model=1024, num_heads=16, head_dim=64),
    "0.76B": dict(num_layers=24, d_model=1536, num_heads=24, head_dim=64),
    "1.4B": dict(num_layers=24, d_model=2048, num_heads=16, head_dim=128),
    "7B": dict(num_layers=32, d_model=4096, num_heads=32, head_dim=128),
}

# Llama 2's 32000 pieces + <boi>, <eoi>, padded to a multiple of 128 (even tensor sharding).
PAPER_VOCAB_SIZE = 32128


def llama_mlp_dim(d_model, multiple_of=256):
  hidden = int(8 * d_model / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def model_config(size=None):
  """The `config.model` block; `size` picks a paper preset (else a tiny model)."""
  m = ml_collections.ConfigDict()
  m.vocab_size = 512
  m.d_model = 64
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 4  # < num_heads for grouped-query attention
  m.head_dim = 16
  m.mlp_dim = 192
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.qk_norm = False  # the paper does not use it (Chameleon's stability option: True)
  m.tie_embeddings = False
  m.dtype = "float32"  # compute dtype; parameters are float32
  # dense (reference) | chunked (XLA, blocked, any backend) | pallas_tpu | pallas_gpu | auto
  # (tfusion/model/attention.py)
  m.attention_impl = "dense"
  m.attention_block = 512  # query/key block size of the chunked / Pallas kernels
  # What the backward keeps per layer (tfusion/model/remat.py): none | minimal (= dots) | qkv |
  # qkv_attn | full | qkv_offload (TPU/GPU). Check fit first: tfusion-aot --config C.
  m.remat = "none"
  m.intra_image = "bidirectional"  # bidirectional (paper) | causal (ablation)
  m.max_len = 256  # context length used by generation

  m.image = ml_collections.ConfigDict()
  # continuous (Transfusion: VAE latents, diffusion, bidirectional image blocks) | discrete
  # (the Chameleon baseline: VQ codes as tokens <boi> c_1..c_n <eoi>, causal, next-token loss;
  # tfusion/discrete.py holds the token mapping: codes are the last codebook_size ids).
  m.image.representation = "continuous"
  m.image.codebook_size = 256  # discrete: the VQ-VAE's number of codes
  m.image.latent_size = 8  # h = w of the VAE latent (discrete: of the VQ code grid)
  m.image.latent_channels = 4
  m.image.patch_size = 2  # 1, 2, 4, 8
  m.image.encoder = "linear"  # linear | unet
  # U-Net widths per level (level i is the latent downsampled 2^i times); patch size p uses
  # the first log2(p) + 1 entries.
  m.image.unet_channels = (32, 64, 64, 64)
  m.image.unet_blocks_per_level = 1

  if size is not None:
    if size not in PAPER_SIZES:
      raise ValueError(f"unknown model size {size!r}; choose from {list(PAPER_SIZES)}")
    m.update(PAPER_SIZES[size])
    m.num_kv_heads = m.num_heads
    m.mlp_dim = llama_mlp_dim(m.d_model)
    m.vocab_size = PAPER_VOCAB_SIZE
    m.max_len = 4096
    m.dtype = "bfloat16"
    m.attention_impl = "auto"  # the dense mask's [B, H, L, L] scores do not fit at L = 4096
    m.image.latent_size = 32  # 256x256 images through an 8x VAE
    m.image.latent_channels = 8
    # Sized so the U-Net adds about 0.27B parameters at 2x2 patches, as in the paper.
    m.image.unet_channels = (768, 1536, 1536, 1536)
    m.image.unet_blocks_per_level = 2
  return m


def eval_config():
  """The `config.eval` block: what `tfusion-eval` measures on each checkpoint."""
  e = ml_collections.ConfigDict()
  e.suites = "ppl"  # comma-separated: fid, clip, caption, ppl, mc, loss (and suites a script registers)
  e.poll_seconds = 30.0  # how often the watcher looks for new checkpoints
  e.seed = 0
  e.batch_size = 16  # rows generated or scored together
  # Devices each process generates on (tfusion/generate/engine.py): sizes over this process's
  # own devices as config.mesh's (-1: all of them); rows over data x fsdp, params sharded by
  # the logical rules (fsdp / tensor for a model too big for one device). 1, 1, 1: one device.
  # Processes split the prompts between them (blocks of batches), whatever this says.
  e.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  # Text to image (fid, clip): prompts from a captions file (.txt one per line, or .jsonl with
  # "caption"); the first num_samples in a seeded random order (the paper: 30k COCO val).
  e.prompts = ""
  e.num_samples = 1000
  e.sampler = ""  # "" = the objective's default (ddpm / euler)
  e.steps = 0  # 0 = the sampler's default (the paper: 250 DDPM steps)
  # DDPM/DDIM only; ""/0 = config.diffusion's (x0_threshold, clip_x0, ... there).
  e.x0_threshold = ""  # none | static | dynamic
  e.clip_x0 = 0.0
  e.threshold_percentile = 0.0
  e.timestep_spacing = ""  # linspace | leading | trailing
  e.guidance_scale = 5.0  # the paper: 5 (main results), 3 (ablations)
  # Which weights of a checkpoint: auto (its EMA when it has one, else the params) | ema | raw.
  e.weights = "auto"
  e.fid_weights = ""  # Inception .npz (tfusion-convert-inception)
  e.fid_reference = ""  # folder of real images; statistics cached in W/eval_cache
  e.clip_weights = ""  # CLIP .npz (tfusion-convert-clip)
  # Captioning: held-out image-caption records; references are the captions of records that
  # share an "id" (one reference per record without an id).
  e.caption_records = ""
  e.caption_max_images = 500
  e.caption_max_tokens = 32
  # Text: perplexity on text files (.txt blank-line separated documents, or .jsonl "text"),
  # multiple choice on task JSONL files (tfusion/evaluate/multiple_choice.py).
  e.ppl_files = ""
  e.ppl_max_tokens = 0  # 0 = every token (the paper: 20M per corpus)
  e.mc_tasks = ""
  e.seq_len = 0  # rows for text scoring; 0 = config.data.seq_len
  # Held-out loss (suite "loss"): ArrayRecord sources as in config.data, packed like training
  # (same mixture weights, no caption dropout); loss_rows rows scored per checkpoint.
  e.loss_text = ""
  e.loss_image_caption = ""
  e.loss_interleaved = ""
  e.loss_rows = 64
  return e


def base_config():
  """All keys with their defaults (a tiny model; paper optimizer settings)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.data = data_config()

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.objective = "ddpm"  # ddpm (paper) | flow (rectified flow)
  c.diffusion.num_train_steps = 1000
  c.diffusion.time_sampling = "logit_normal"  # flow only: logit_normal | uniform
  c.diffusion.logit_mean = 0.0
  c.diffusion.logit_std = 1.0
  # DDPM training (tfusion/diffusion.py CosineDDPM); the flow objective needs the defaults.
  c.diffusion.prediction = "eps"  # eps (paper) | v | x0: what the model outputs
  c.diffusion.loss_weighting = "none"  # none (paper) | min_snr (Hang et al. 2023)
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.zero_terminal_snr = False  # rescale so the last step is pure noise (v or x0 only)
  # DDPM sampler defaults (ddpm, ddim; config.eval and tfusion-generate flags override them).
  # Unbounded, a trained eps model's small error at step 999 (alpha_bar 2.4e-9) is amplified
  # hundreds of times and saturates the latents; latents are normalised to unit variance, so
  # clipping the clean estimate at 3 standard deviations leaves correct estimates alone.
  c.diffusion.x0_threshold = "static"  # none | static (clip at clip_x0) | dynamic (Imagen)
  c.diffusion.clip_x0 = 3.0  # the bound (dynamic: the floor of the per-sample threshold)
  c.diffusion.threshold_percentile = 0.995  # dynamic: percentile of |x0| per sample
  c.diffusion.timestep_spacing = "trailing"  # linspace | leading | trailing (Lin et al. 2024)

  c.vae = ml_collections.ConfigDict()
  c.vae.path = ""  # VAE directory (diffusers format, tfusion/vae/): decodes samples to pixels

  c.loss = ml_collections.ConfigDict()
  c.loss.image_weight = 5.0  # lambda
  # z-loss coefficient: + z_loss * mean(logsumexp(logits)^2) over the LM positions (Chameleon's
  # stability option, 1e-5 there; 0 = off, the paper's Transfusion). Dense logits only.
  c.loss.z_loss = 0.0
  # Text CE over chunks of this many positions, recomputed in the backward, so the [B, L, V]
  # float32 logits never exist (tfusion/chunked_ce.py); 0 = dense logits.
  c.loss.ce_chunk_size = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4
  c.optim.end_lr = 1.5e-5
  c.optim.warmup_steps = 4000
  c.optim.decay_steps = 250_000  # cosine decay ends here (usually = total steps)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_norms_and_embeddings = False
  c.optim.grad_clip = 1.0
  # Branches of another run (tfusion-train --init_from): the schedule is read at
  # step + schedule_offset (the parent's step S continues its schedule; 0 re-warms), and a
  # cool-down of cooldown_steps > 0 from step cooldown_start of this run decays the lr from
  # its value there to end_lr (WSD-style), linear or cosine.
  c.optim.schedule_offset = 0
  c.optim.cooldown_steps = 0
  c.optim.cooldown_start = 0
  c.optim.cooldown_shape = "linear"  # linear | cosine

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.log_every = 10  # steps between log lines / metric records
  c.train.validate_batches = True  # check each host batch against the contract (cheap numpy)
  c.train.max_nonfinite_steps = 10  # stop after this many skipped non-finite steps in a row
  # Resuming from a checkpoint whose optimizer state does not fit this config (another
  # optimizer setting): auto refuses, naming what differs; params_only restores params, step
  # and data position and starts a fresh optimizer state.
  c.train.restore = "auto"
  # Exit status after a preemption (SIGTERM) saved its checkpoint: 0, or e.g. 75 (EX_TEMPFAIL)
  # so a launcher can requeue (launch/slurm.sbatch does).
  c.train.preempted_exit_code = 0
  # Exponential moving average of the params (tfusion/ema.py), used by eval/generate when
  # present. 0 = off (the paper does not mention one); e.g. 0.999 for runs of >= 10k steps.
  c.train.ema_decay = 0.0

  c.eval = eval_config()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Multi-slice / multi-host DCN: how many slices (hosts, where devices have no slice) the data
  # and fsdp axes above span. Several slices with both 1: data spans them, FSDP stays inside.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3  # the newest checkpoints kept
  c.checkpoint.keep_period = 0  # also keep every step divisible by this forever (0: none)
  c.checkpoint.async_save = True
  return c


def load_python_function(path, name, what="config file"):
  """The function `name` of the Python file at `path` (config and sweep files are code).

  Raises FileNotFoundError when the file is missing and ValueError when it lacks `name`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_tfusion_" + name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, name):
    raise ValueError(f"{what} {path!r} has no {name}()")
  return getattr(module, name)


def load_config_file(spec):
  """Loads `path.py[:arg]` by calling its `get_config(arg)`. Returns a ConfigDict."""
  path, _, arg = spec.partition(":")
  get_config = load_python_function(path, "get_config")
  return get_config(arg) if arg else get_config()


def apply_overrides(config, overrides):
  """Sets every dotted key of `overrides` ({"optim.lr": 1e-3}) in `config` (in place; lists
  become tuples, as config flags give them). Returns config."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


# Config keys that hold local paths (comma-separated lists allowed). A run stores them
# absolute in W/config.json, so eval and generate find them from any directory.
PATH_KEYS = (
    "data.tokenizer", "data.text", "data.image_caption", "data.interleaved", "vae.path",
    "eval.prompts", "eval.fid_weights", "eval.fid_reference", "eval.clip_weights",
    "eval.caption_records", "eval.ppl_files", "eval.mc_tasks", "eval.loss_text",
    "eval.loss_image_caption", "eval.loss_interleaved",
)


def absolute_paths(config, base=None):
  """Makes every PATH_KEYS entry of `config` absolute (in place, relative to `base` or the
  current directory; `~` expanded; URLs like gs://... kept). Returns config."""
  base = os.path.abspath(base or os.getcwd())

  def fix(part):
    part = part.strip()
    if not part or "://" in part:
      return part
    return os.path.normpath(os.path.join(base, os.path.expanduser(part)))

  for key in PATH_KEYS:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node.get(name) if name in node else None
      if node is None:
        break
    if node is None or leaf not in node or not isinstance(node[leaf], str) or not node[leaf]:
      continue
    node[leaf] = ",".join(fix(p) for p in node[leaf].split(",") if p.strip())
  return config
