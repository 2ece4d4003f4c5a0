"""The demo's data, all shipped with installed packages: no downloads.

Images: scikit-learn's 1797 handwritten digits (8x8, 0..16), upscaled to 32x32 RGB. The last
297 are held out: never trained on, used to judge generations and captioning. Captions:
"a handwritten digit seven" and a few paraphrases. Text: CPython's pydoc topic pages; five of
them are held out for perplexity.
"""

import numpy as np

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a handwritten digit {}", "the number {}", "a drawing of the digit {}",
             "handwritten {}", "the digit {} written by hand")
EVAL_TEMPLATE = TEMPLATES[0]
NUM_HELD_OUT = 297
HELD_OUT_DOCS = 5


def digits():
  """(images float [N, 8, 8] in [0, 1], labels int [N])."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def upscale(images8, size=32):
  """[N, 8, 8] in [0, 1] -> uint8 RGB [N, size, size, 3] (bicubic, as the VAE's loader)."""
  from tfusion.vae import images as images_lib
  out = [images_lib.array_to_model_input(img, size) for img in images8]
  return images_lib.to_uint8(np.stack(out))


def split():
  """(train images8, train labels, held-out images8, held-out labels)."""
  x, y = digits()
  return x[:-NUM_HELD_OUT], y[:-NUM_HELD_OUT], x[-NUM_HELD_OUT:], y[-NUM_HELD_OUT:]


def captions_for(labels, seed, copies=2):
  """`copies` captions per label with random templates -> (indices, captions)."""
  rng = np.random.default_rng(seed)
  index, caps = [], []
  for i, label in enumerate(labels):
    for t in rng.choice(len(TEMPLATES), size=copies, replace=False):
      index.append(i)
      caps.append(TEMPLATES[t].format(WORDS[label]))
  return np.asarray(index), caps


def eval_caption(label):
  return EVAL_TEMPLATE.format(WORDS[label])


def named_digit(text):
  """The digit a caption names (a word or a numeral), or None if it names none or several."""
  tokens = text.lower().replace(".", " ").replace(",", " ").split()
  found = {WORDS.index(t) for t in tokens if t in WORDS}
  found |= {int(t) for t in tokens if t.isdigit() and len(t) == 1}
  return found.pop() if len(found) == 1 else None


def text_documents():
  """(train docs, held-out docs) of pydoc topic pages, as strings."""
  from tfusion.data import samples
  docs = [text for _, text in samples.pydoc_topics()]
  return docs[:-HELD_OUT_DOCS], docs[-HELD_OUT_DOCS:]
