"""The SentencePiece tokenizer: trained with <boi>/<eoi>, loaded with them appended, round trips."""

import pickle

import pytest
import sentencepiece as spm

from tfusion.data import samples
from tfusion.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  return samples.sample_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=800)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
  """A model without <boi>/<eoi> (like Llama 2's)."""
  d = tmp_path_factory.mktemp("plain")
  corpus = samples.write_text_file(str(d / "corpus.txt"), samples.pydoc_topics()[:20])
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=str(d / "plain"), vocab_size=500,
                                 model_type="bpe", byte_fallback=True, num_threads=1,
                                 minloglevel=2)
  return str(d / "plain.model")


def test_trained_tokenizer_has_the_special_ids_and_round_trips(trained):
  assert (trained.bos_id, trained.eos_id, trained.boi_id, trained.eoi_id) == (1, 2, 3, 4)
  assert trained.vocab_size == 800
  for _, text in samples.pydoc_topics()[:10]:
    ids = trained.encode(text)
    assert ids and max(ids) < trained.vocab_size
    assert trained.decode(ids) == text
  odd = "naïve café — 東京 🙂 \t tabs  and  double spaces"
  assert trained.decode(trained.encode(odd)) == odd  # byte fallback: nothing is lost


def test_literal_delimiters_in_text_stay_text(trained):
  text = "an HTML-ish <boi> tag and <eoi> here"
  ids = trained.encode(text)
  assert trained.boi_id not in ids and trained.eoi_id not in ids
  assert trained.decode(ids) == text
  assert trained.encode_batch([text, "plain words"]) == [ids, trained.encode("plain words")]


def test_model_without_delimiters_gets_them_appended(plain_model):
  tok = tokenizer_lib.load_tokenizer(plain_model)
  assert (tok.boi_id, tok.eoi_id) == (500, 501)
  assert tok.vocab_size == 502
  ids = tok.encode("some text <boi> with a literal tag")
  assert max(ids) < 500
  assert tok.decode([tok.boi_id] + ids + [tok.eoi_id]) == "some text <boi> with a literal tag"


def test_tokenizer_pickles_for_worker_processes(trained):
  again = pickle.loads(pickle.dumps(trained))
  assert again.encode("def f(x): return x") == trained.encode("def f(x): return x")
  assert again.vocab_size == trained.vocab_size


def test_bad_paths_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    tokenizer_lib.load_tokenizer("")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizer_lib.load_tokenizer(str(junk))


def test_console_script_trains_a_model(tmp_path, capsys):
  corpus = samples.write_text_file(str(tmp_path / "c.txt"), samples.pydoc_topics()[:15])
  tokenizer_lib.main(["--input", corpus, "--vocab_size", "400", "--out_prefix",
                      str(tmp_path / "out" / "tok")])
  assert "vocab_size=400" in capsys.readouterr().out
  tok = tokenizer_lib.load_tokenizer(str(tmp_path / "out" / "tok.model"))
  assert (tok.boi_id, tok.eoi_id) == (3, 4)
  with pytest.raises(SystemExit) as e:
    tokenizer_lib.main(["--input", str(tmp_path / "missing.txt"), "--vocab_size", "400",
                        "--out_prefix", str(tmp_path / "x")])
  assert e.value.code == 2
  assert "missing.txt" in capsys.readouterr().err
