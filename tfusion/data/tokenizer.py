"""SentencePiece tokenizer with the two image delimiters <boi> and <eoi>.

`load_tokenizer(path)` reads any SentencePiece model (e.g. Llama 2's `tokenizer.model`). When
the model has no `<boi>`/`<eoi>` pieces their ids are appended after the model's pieces
(Llama 2: 32000 and 32001), so `vocab_size` grows by two. `train_tokenizer` (console script
`tfusion-train-tokenizer`) makes a new BPE model whose pieces include `<boi>`/`<eoi>` as
user-defined symbols, with byte fallback (no unknown tokens).

`encode` never returns BOI/EOI for ordinary text: a literal "<boi>" in a document is written
with byte pieces, so only the data pipeline places image delimiters.
"""

import argparse
import os
import sys

import sentencepiece as spm

BOI_PIECE = "<boi>"
EOI_PIECE = "<eoi>"


class Tokenizer:
  """Text <-> ids. encode() adds no BOS/EOS (the pipeline adds them per document)."""

  def __init__(self, model_proto, *, source="<memory>"):
    self._proto = model_proto
    self.source = source
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._model_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"tokenizer {source} defines no BOS or EOS piece (bos_id="
                       f"{self.bos_id}, eos_id={self.eos_id}); both are needed per document")
    appended = self._model_size
    ids = []
    for piece in (BOI_PIECE, EOI_PIECE):
      pid = self._sp.piece_to_id(piece)
      if pid == self._sp.unk_id() and piece != self._sp.id_to_piece(pid):
        pid, appended = appended, appended + 1  # not in the model: append
      ids.append(pid)
    self.boi_id, self.eoi_id = ids
    self.vocab_size = appended
    self._in_model = {i for i in ids if i < self._model_size}
    self._escapes = {}
    for piece, pid in zip((BOI_PIECE, EOI_PIECE), ids):
      if pid in self._in_model:
        self._escapes[pid] = self._byte_pieces(piece)

  def _byte_pieces(self, text):
    """Ids of the byte-fallback pieces spelling `text`, or None if the model has none."""
    out = []
    for byte in text.encode("utf-8"):
      pid = self._sp.piece_to_id(f"<0x{byte:02X}>")
      if pid == self._sp.unk_id():
        return None
      out.append(pid)
    return out

  def encode(self, text):
    """str -> list[int] (no BOS/EOS; never BOI/EOI)."""
    ids = self._sp.encode(text)
    if self._in_model and not self._in_model.isdisjoint(ids):
      ids = self._escape(ids)
    return ids

  def encode_batch(self, texts):
    """list[str] -> list[list[int]] (one C++ call; same ids as `encode`)."""
    batch = self._sp.encode(list(texts))
    if self._in_model:
      batch = [self._escape(ids) if not self._in_model.isdisjoint(ids) else ids for ids in batch]
    return batch

  def _escape(self, ids):
    out = []
    for i in ids:
      if i in self._in_model:
        spelled = self._escapes[i]
        if spelled is None:
          raise ValueError(f"text contains the literal {self._sp.id_to_piece(i)!r} and the "
                           f"tokenizer {self.source} has no byte pieces to spell it as text")
        out.extend(spelled)
      else:
        out.append(i)
    return out

  def decode(self, ids):
    """list[int] -> str. BOI/EOI (and ids beyond the vocabulary) are dropped."""
    keep = [int(i) for i in ids
            if 0 <= int(i) < self._model_size and int(i) not in (self.boi_id, self.eoi_id)]
    return self._sp.decode(keep)

  def __getstate__(self):  # picklable for Grain worker processes
    return {"model_proto": self._proto, "source": self.source}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], source=state["source"])

  def __repr__(self):
    return (f"Tokenizer({self.source}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, boi={self.boi_id}, eoi={self.eoi_id})")


def load_tokenizer(path):
  """Loads a SentencePiece `.model` file; adds <boi>/<eoi> ids when the model lacks them."""
  if not path:
    raise ValueError("a tokenizer path is required (config.data.tokenizer): a SentencePiece "
                     ".model file, e.g. Llama 2's tokenizer.model or one made by "
                     "tfusion-train-tokenizer")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return Tokenizer(proto, source=path)
  except RuntimeError as e:
    raise ValueError(f"{path} is not a SentencePiece model ({e})") from None


def train_tokenizer(text_files, vocab_size, out_prefix, *, model_type="bpe",
                    max_sentences=2_000_000, num_threads=None):
  """Trains a SentencePiece model on text files (one sentence/paragraph per line).

  Llama-like settings: BPE, byte fallback, digits split, no normalization; ids unk=0, bos=1,
  eos=2, boi=3, eoi=4 (user-defined symbols). Writes `{out_prefix}.model` and `.vocab`.
  Returns the loaded `Tokenizer`.
  """
  text_files = list(text_files)
  if not text_files:
    raise ValueError("train_tokenizer needs at least one text file")
  for path in text_files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"text file {path!r} does not exist")
    if os.path.getsize(path) == 0:
      raise ValueError(f"text file {path!r} is empty")
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(out_dir, exist_ok=True)
  spm.SentencePieceTrainer.train(
      input=text_files, model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
      byte_fallback=True, split_digits=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, character_coverage=0.9995,
      user_defined_symbols=[BOI_PIECE, EOI_PIECE], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      input_sentence_size=max_sentences, shuffle_input_sentence=True,
      max_sentence_length=16384, num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2)
  return load_tokenizer(out_prefix + ".model")


def main(argv=None):
  """Console script `tfusion-train-tokenizer`."""
  parser = argparse.ArgumentParser(
      description="Train a SentencePiece BPE tokenizer with <boi>/<eoi> and byte fallback.")
  parser.add_argument("--input", required=True, nargs="+",
                      help="text files (one paragraph per line)")
  parser.add_argument("--vocab_size", type=int, required=True,
                      help="pieces incl. <unk>, <s>, </s>, <boi>, <eoi> and 256 bytes")
  parser.add_argument("--out_prefix", required=True, help="writes OUT_PREFIX.model and .vocab")
  parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
  parser.add_argument("--max_sentences", type=int, default=2_000_000,
                      help="lines sampled from the input for training")
  args = parser.parse_args(argv)
  try:
    tok = train_tokenizer(args.input, args.vocab_size, args.out_prefix,
                          model_type=args.model_type, max_sentences=args.max_sentences)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"tfusion-train-tokenizer: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.out_prefix}.model: {tok}")


if __name__ == "__main__":
  main()
