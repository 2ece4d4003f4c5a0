"""Text evaluation: packed scoring equals scoring each request alone; perplexity and
multiple-choice bookkeeping; task-file errors name the file and line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import configlib
from tfusion.evaluate import multiple_choice, perplexity, text_scoring
from tfusion.model import transfusion


class ByteTokenizer:
  """Bytes as ids 3..258; enough of the tokenizer interface for these tests."""
  bos_id, eos_id, vocab_size = 1, 2, 259

  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def model_and_params():
  config = configlib.base_config().model
  config.vocab_size = 259
  model = transfusion.Transfusion(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, ids, ids + 1, ids - 1,
                               jnp.zeros((1, 1, 8, 8, 4)), jnp.zeros((1, 1)))
  return model, params


def test_packed_scores_equal_each_request_scored_alone(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  requests = [text_scoring.Request(rng.integers(3, 259, n).astype(np.int32), int(s))
              for n, s in [(5, 1), (17, 9), (3, 2), (30, 1), (12, 11), (8, 4), (25, 20)]]
  scorer = text_scoring.make_scorer(model, params, batch_size=2, length=32)
  sums, counts, _ = scorer(requests)
  assert text_scoring.pack_requests(requests, 32)["tokens"].shape[0] < len(requests)  # packed
  alone = jax.jit(lambda ids, seg: model.apply(
      params, ids, jnp.arange(32)[None], seg, method=transfusion.Transfusion.text_forward))
  for r, req in enumerate(requests):
    n = len(req.ids)  # alone in a row: the request, then padding (segment 0)
    logits = alone(jnp.zeros((1, 32), jnp.int32).at[0, :n].set(req.ids),
                   (jnp.arange(32) < n).astype(jnp.int32)[None])
    logp = jax.nn.log_softmax(logits[0, :n - 1], axis=-1)[jnp.arange(n - 1), req.ids[1:]]
    want = float(logp[req.score_from - 1:].sum())
    assert counts[r] == n - req.score_from
    np.testing.assert_allclose(sums[r], want, rtol=1e-5, atol=1e-4)


def test_perplexity_scores_every_token_once(model_and_params):
  model, params = model_and_params
  docs = ["short one", "x" * 100, "a medium length document of text"]
  scorer = text_scoring.make_scorer(model, params, batch_size=4, length=32)
  result = perplexity.perplexity(scorer, ByteTokenizer(), docs, length=32)
  assert result["tokens"] == sum(len(d.encode()) + 1 for d in docs)  # BOS..EOS: n+2 ids, n+1 targets
  assert 1 < result["ppl"] < 259 * 3  # a random model is near uniform over 259 ids
  limited = perplexity.perplexity(scorer, ByteTokenizer(), docs, length=32, max_tokens=50)
  assert limited["tokens"] == 50


def test_perplexity_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    perplexity.read_documents(str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(ValueError, match="empty.txt"):
    perplexity.read_documents(str(empty))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    perplexity.read_documents(str(bad))


def test_multiple_choice_accuracy_and_length_normalization(tmp_path):
  path = tmp_path / "task.jsonl"
  lines = [
      {"context": "Q: 2+2?\nA:", "choices": [" 4", " 5"], "gold": 0},
      {"context": "Q: sky?\nA:", "choices": [" blue", " a very long wrong answer"], "gold": 0},
      {"contexts": ["The cup fell because it", "The cup fell because the table"],
       "continuation": " was unstable.", "gold": 1},
  ]
  path.write_text("\n".join(json.dumps(x) for x in lines))
  items = multiple_choice.load_task(str(path))
  tok = ByteTokenizer()

  def scorer(requests):
    # A fake model: log-likelihood = -(number of scored tokens) - 0.1 * (sum of context ids % 7).
    sums = np.array([-(len(r.ids) - r.score_from) - 0.1 * (sum(r.ids[:r.score_from]) % 7)
                     for r in requests], np.float64)
    return sums, None, None

  result = multiple_choice.evaluate_task(scorer, tok, items, max_len=64)
  # Shorter continuations win: q1 gold " 4" (tie on length with " 5"; context identical, so
  # argmax picks the first), q2 " blue"; q3 has equal continuations, decided by the context term.
  ctx_term = [sum(multiple_choice.encode_pair(tok, c, " was unstable.", 64)[0][:-14]) % 7
              for c in lines[2]["contexts"]]
  q3_correct = int(np.argmax([-0.1 * t for t in ctx_term]) == 1)
  assert result["n"] == 3
  assert result["acc"] == pytest.approx((2 + q3_correct) / 3)


def test_encode_pair_moves_trailing_space_and_truncates_left():
  tok = ByteTokenizer()
  ids, start = multiple_choice.encode_pair(tok, "Answer: ", "yes", max_len=64)
  assert list(ids[start:]) == tok.encode(" yes")
  ids, start = multiple_choice.encode_pair(tok, "c" * 100, " end", max_len=20)
  assert len(ids) == 20 and list(ids[start:]) == tok.encode(" end")


@pytest.mark.parametrize("line,message", [
    ("not json", "not valid JSON"),
    ('{"context": "c", "choices": ["a"], "gold": 0}', "choices"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"question": "c"}', "needs"),
])
def test_malformed_task_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "t.jsonl"
  path.write_text('{"context": "c", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
  with pytest.raises(multiple_choice.TaskFileError, match=rf"t.jsonl:2: .*{message}"):
    multiple_choice.load_task(str(path))


SAMPLES = {
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man cuts onions.",
                  "ctx_b": "then he", "endings": ["cries [title] a lot.", "flies.", "sings.",
                                                  "sleeps."], "label": "0"},
    "piqa": {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Freeze it."},
    "siqa": {"context": "Kim lent a pen.", "question": "How does Kim feel?", "answerA": "kind",
             "answerB": "sad", "answerC": "angry"},
    "arc": {"question": {"stem": "What is 2+2?", "choices": [
        {"text": "3", "label": "A"}, {"text": "4", "label": "B"}]}, "answerKey": "B"},
    "boolq": {"question": "is water wet", "passage": "Water is wet.", "answer": True},
    "winogrande": {"sentence": "The ball broke the window because _ was hard.",
                   "option1": "the ball", "option2": "the window", "answer": "1"},
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_converters_write_loadable_tasks(tmp_path, fmt):
  from tfusion.evaluate import mc_convert
  src, dst, labels = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "labels.lst"
  src.write_text(json.dumps(SAMPLES[fmt]) + "\n")
  labels.write_text({"piqa": "0\n", "siqa": "1\n"}.get(fmt, ""))
  assert mc_convert.convert(fmt, str(src), str(dst), str(labels)) == 1
  item = multiple_choice.load_task(str(dst))[0]
  gold_pair = item["pairs"][item["gold"]]
  expected = {"hellaswag": (" cries. a lot.", "Cooking: A man cuts onions. Then he"),
              "piqa": (" Twist the lid.", None), "siqa": (" kind", None), "arc": (" 4", None),
              "boolq": (" yes", None), "winogrande": (" was hard.", "The ball broke the window "
                                                                    "because the ball")}[fmt]
  assert gold_pair[1] == expected[0]
  if expected[1]:
    assert gold_pair[0] == expected[1]


def test_converter_errors_name_the_line(tmp_path):
  from tfusion.evaluate import mc_convert
  src = tmp_path / "arc.jsonl"
  src.write_text(json.dumps(SAMPLES["arc"]) + "\n" + json.dumps({"question": "?"}) + "\n")
  with pytest.raises(ValueError, match="arc.jsonl:2"):
    mc_convert.convert("arc", str(src), str(tmp_path / "o.jsonl"))
