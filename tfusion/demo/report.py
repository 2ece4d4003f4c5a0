"""The demo's pictures and report: W/samples.png, W/captions.png, W/curves.png, W/report.md."""

import collections
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from tfusion import metrics as metrics_lib
from tfusion.demo import data as demo_data
from tfusion.demo import suites as demo_suites
from tfusion.generate import output


def unigram_perplexity(tokenizer, train_docs, heldout_docs):
  """Perplexity of an add-one-smoothed unigram model of the training text on held-out docs,
  over the same targets the model's perplexity counts (the document's tokens and EOS)."""
  counts = collections.Counter()
  for doc in train_docs:
    counts.update(tokenizer.encode(doc) + [tokenizer.eos_id])
  total = sum(counts.values()) + tokenizer.vocab_size
  nll, n = 0.0, 0
  for doc in heldout_docs:
    for t in tokenizer.encode(doc) + [tokenizer.eos_id]:
      nll -= math.log((counts[t] + 1) / total)
      n += 1
  return math.exp(nll / n)


def _save(image, path):
  tmp = path + ".tmp.png"
  image.save(tmp)
  os.replace(tmp, path)


def captions_picture(images, captions, labels, cols=6):
  """Real digits with their generated captions under them (green: names the right digit)."""
  font = output.label_font(11)
  tile, text_h, pad = 64, 28, 6
  width = 150
  rows = math.ceil(len(images) / cols)
  out = Image.new("RGB", (cols * (width + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
  draw = ImageDraw.Draw(out)
  for i, (img, cap, label) in enumerate(zip(images, captions, labels)):
    r, c = divmod(i, cols)
    x, y = pad + c * (width + pad), pad + r * (tile + text_h + pad)
    picture = Image.fromarray(img).resize((tile, tile), Image.NEAREST)
    out.paste(picture, (x + (width - tile) // 2, y))
    ok = demo_data.named_digit(cap) == label
    words, line, lines = cap.split(), "", []
    for w in words:  # wrap into at most two lines
      if draw.textlength((line + " " + w).strip(), font=font) > width and line:
        lines.append(line)
        line = w
      else:
        line = (line + " " + w).strip()
    lines.append(line)
    draw.text((x, y + tile + 1), "\n".join(lines[:2]), fill=(0, 128, 0) if ok else (200, 0, 0),
              font=font)
  return out


def write_report(config, workdir, p, final_step):
  from tfusion.data import tokenizer as tokenizer_lib
  from tfusion.evaluate import plot
  run = p["run"]
  evals = metrics_lib.read_jsonl(os.path.join(run, "metrics", "eval.jsonl"))
  last = {}
  for r in evals:  # the last record of each (step, suite)
    last[(r["step"], r["suite"])] = r
  digits_final = last.get((final_step, "digits"), {})
  digits_zero = last.get((0, "digits"), {})
  captions_final = last.get((final_step, "digit_caption"), {})
  ppl_final = last.get((final_step, "ppl"), {})
  loss_final, loss_zero = last.get((final_step, "loss"), {}), last.get((0, "loss"), {})

  # Pictures of the suites that ran (--config.eval.suites may leave some out).
  pictures = []
  # samples.png: one row per digit prompt.
  sample_file = os.path.join(run, "eval_samples", f"digits_step{final_step}.npz")
  if os.path.exists(sample_file):
    with np.load(sample_file) as s:
      images, labels = s["images"], s["labels"]
    per = min(int(np.sum(labels == 0)), config.demo.grid_per_digit)
    grid = np.stack([images[labels == d][:per] for d in range(10)])
    _save(output.labelled_grid(grid, [f'"{demo_data.eval_caption(d)}"' for d in range(10)]),
          os.path.join(workdir, "samples.png"))
    pictures.append("samples")

  # captions.png: held-out real digits and what the model says about them.
  captions_file = os.path.join(run, "eval_samples", f"captions_step{final_step}.json")
  if os.path.exists(captions_file):
    with open(captions_file) as f:
      caps = json.load(f)
    _, _, hx, _ = demo_data.split()
    n = min(24, len(caps["captions"]))
    _save(captions_picture(demo_data.upscale(hx[:n]), caps["captions"][:n], caps["labels"][:n]),
          os.path.join(workdir, "captions.png"))
    pictures.append("captions")

  # curves.png: training losses and the evaluations.
  train = metrics_lib.read_jsonl(os.path.join(run, "metrics", "train.jsonl"))
  panels = [("training loss", {k: plot.series(train, k) for k in ("text_loss", "image_loss")}),
            ("held-out loss", {k: plot.series(evals, f"loss/{k}") for k in ("text", "image")})]
  for key, title in (("t2i_accuracy", "text-to-image accuracy (judge)"),
                     ("digit_fid", "digit-FID"), ("caption_accuracy", "captioning accuracy"),
                     ("ppl/heldout_text", "text perplexity (held-out)")):
    panels.append((title, {key: plot.series(evals, key)}))
  discrete = config.model.image.get("representation", "continuous") == "discrete"
  plot.plot_curves(panels, os.path.join(workdir, "curves.png"),
                   title="tfusion demo (discrete image tokens)" if discrete else
                   f"tfusion demo ({config.model.intra_image} attention inside images)")

  tok = tokenizer_lib.load_tokenizer(p["tokenizer"])
  train_docs, held_docs = demo_data.text_documents()
  unigram = unigram_perplexity(tok, train_docs, [" ".join(d.split()) for d in held_docs])
  vae_report = {}
  vae_report_path = os.path.join(p["vae"], "train_report.json")
  if os.path.exists(vae_report_path):
    with open(vae_report_path) as f:
      vae_report = json.load(f)
  numbers = {
      "final_step": final_step,
      "t2i_accuracy": digits_final.get("t2i_accuracy"),
      "t2i_accuracy_per_digit": {w: digits_final.get(f"t2i_accuracy/{w}")
                                 for w in demo_data.WORDS},
      "digit_fid": digits_final.get("digit_fid"),
      "digit_fid_step0": digits_zero.get("digit_fid"),
      "caption_accuracy": captions_final.get("caption_accuracy"),
      "heldout_image_loss": loss_final.get("loss/image"),
      "heldout_image_loss_step0": loss_zero.get("loss/image"),
      "heldout_caption_loss": loss_final.get("loss/text"),
      "ppl": ppl_final.get("ppl/heldout_text"),
      "unigram_ppl": unigram,
      "judge_heldout_accuracy": demo_suites.judge_heldout_accuracy(),
      "vae_heldout_psnr": vae_report.get("heldout_psnr"),
      "first_loss": train[0]["loss"] if train else None,
      "last_loss": train[-1]["loss"] if train else None,
      "intra_image": config.model.intra_image,
      "representation": config.model.image.get("representation", "continuous"),
      "settings": digits_final.get("settings"),
  }
  _write_json(os.path.join(workdir, "report.json"), numbers)
  _write_text(os.path.join(workdir, "report.md"), _markdown(config, numbers, pictures))
  return numbers


def _write_json(path, obj):
  _write_text(path, json.dumps(obj, indent=2))


def _write_text(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _fmt(x, spec=".3f"):
  return "n/a" if x is None else format(x, spec)


_PICTURE_TEXT = {
    "samples": "Generated for each prompt (one row per caption).",
    "captions": "Held-out real digits with the captions the model wrote (green: names the "
                "right digit).",
}


def _markdown(config, n, pictures):
  discrete = n.get("representation") == "discrete"
  model = ("Chameleon-style model (discrete VQ image tokens, causal attention)" if discrete
           else "Transfusion")
  attention = ("" if discrete else
               f", with {config.model.intra_image} attention inside images")
  image_loss = ("held-out image-token loss (next-token CE)" if discrete
                else "held-out image (diffusion) loss")
  vae = "VQ-VAE" if discrete else "VAE"
  per_digit = " | ".join(_fmt(n["t2i_accuracy_per_digit"][w], ".2f") for w in demo_data.WORDS)
  s = n["settings"] or {}
  return f"""# tfusion demo report

A {config.model.num_layers}-layer, {config.model.d_model}-wide {model} trained for
{n['final_step']} steps on CPU on scikit-learn's handwritten digits (captioned) and CPython's
pydoc pages{attention}.

| measure | value | reference |
|---|---|---|
| text-to-image accuracy (digit judge) | **{_fmt(n['t2i_accuracy'])}** | chance 0.100; judge on held-out real digits {_fmt(n['judge_heldout_accuracy'])} |
| digit-FID, generated vs held-out real | **{_fmt(n['digit_fid'], '.2f')}** | untrained model (step 0): {_fmt(n['digit_fid_step0'], '.2f')} |
| {image_loss} | **{_fmt(n['heldout_image_loss'])}** | untrained model (step 0): {_fmt(n['heldout_image_loss_step0'])} |
| captioning accuracy (held-out digits) | **{_fmt(n['caption_accuracy'])}** | chance 0.100 |
| text perplexity (held-out pydoc pages) | **{_fmt(n['ppl'], '.1f')}** | unigram model: {_fmt(n['unigram_ppl'], '.1f')} |
| {vae} held-out PSNR | {_fmt(n['vae_heldout_psnr'], '.2f')} dB | |
| training loss | {_fmt(n['first_loss'])} -> {_fmt(n['last_loss'])} | |

Per digit (zero..nine): {per_digit}

Sampling: {s.get('sampler', 'n/a')}, {s.get('steps', 'n/a')} steps, guidance scale
{s.get('guidance_scale', 'n/a')}, {s.get('num_samples', 'n/a')} samples.

""" + "".join(f"![{name}]({name}.png)\n\n{_PICTURE_TEXT[name]}\n\n" for name in pictures) + \
      "![curves](curves.png)\n"
