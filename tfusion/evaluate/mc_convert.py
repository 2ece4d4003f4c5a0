"""Converts public multiple-choice files into tfusion's task JSONL (see multiple_choice.py).

    tfusion-convert-mc --format hellaswag --input hellaswag_val.jsonl --output hellaswag.jsonl
    tfusion-convert-mc --format piqa --input valid.jsonl --labels valid-labels.lst --output piqa.jsonl

Formats (the files as their authors distribute them) and the prompts used, following
lm-evaluation-harness:
  hellaswag   {"activity_label", "ctx_a", "ctx_b", "endings", "label"}; context
              "<activity>: <ctx_a> <Ctx_b>", choices " <ending>" (WikiHow [brackets] removed).
  piqa        {"goal", "sol1", "sol2"} + --labels (one 0/1 per line); "Question: <goal>\\nAnswer:".
  siqa        {"context", "question", "answerA".."answerC"} + --labels (1-based);
              "Question: <context> <question>\\nAnswer:".
  arc         {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} (ARC-Easy and
              ARC-Challenge); "Question: <stem>\\nAnswer:".
  boolq       {"question", "passage", "answer": bool}; "<passage>\\nQuestion: <question>?\\nAnswer:",
              choices " no" / " yes".
  winogrande  {"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}; partial scoring:
              one context per option (the sentence up to "_" with the option filled in) and the
              rest of the sentence as the shared continuation.
"""

import argparse
import json
import re


def _hellaswag_clean(text):
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(item, _):
  ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
  return {"context": _hellaswag_clean(item["activity_label"] + ": " + ctx),
          "choices": [" " + _hellaswag_clean(e) for e in item["endings"]],
          "gold": int(item["label"])}


def _piqa(item, label):
  return {"context": f"Question: {item['goal']}\nAnswer:",
          "choices": [" " + item["sol1"], " " + item["sol2"]], "gold": int(label)}


def _siqa(item, label):
  return {"context": f"Question: {item['context']} {item['question']}\nAnswer:",
          "choices": [" " + item[k] for k in ("answerA", "answerB", "answerC")],
          "gold": int(label) - 1}


def _arc(item, _):
  labels = [c["label"] for c in item["question"]["choices"]]
  return {"context": f"Question: {item['question']['stem']}\nAnswer:",
          "choices": [" " + c["text"] for c in item["question"]["choices"]],
          "gold": labels.index(item["answerKey"])}


def _boolq(item, _):
  return {"context": f"{item['passage']}\nQuestion: {item['question']}?\nAnswer:",
          "choices": [" no", " yes"], "gold": int(bool(item["answer"]))}


def _winogrande(item, _):
  sentence = item["sentence"]
  blank = sentence.index("_")
  return {"contexts": [sentence[:blank] + item[k] for k in ("option1", "option2")],
          "continuation": " " + sentence[blank + 1:].strip(), "gold": int(item["answer"]) - 1}


FORMATS = {"hellaswag": _hellaswag, "piqa": _piqa, "siqa": _siqa, "arc": _arc, "boolq": _boolq,
           "winogrande": _winogrande}
NEEDS_LABELS = ("piqa", "siqa")


def convert(fmt, input_path, output_path, labels_path=None):
  """Converts one file; returns the number of questions written. Errors name file and line."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
  labels = None
  if fmt in NEEDS_LABELS:
    if not labels_path:
      raise ValueError(f"format {fmt!r} keeps its answers in a separate file: pass --labels")
    with open(labels_path, encoding="utf-8") as f:
      labels = [line.strip() for line in f if line.strip()]
  out = []
  with open(input_path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      label = None
      if labels is not None:
        if len(out) >= len(labels):
          raise ValueError(f"{labels_path}: fewer labels than questions in {input_path} "
                           f"(question at line {line_no})")
        label = labels[len(out)]
      try:
        out.append(FORMATS[fmt](json.loads(line), label))
      except (json.JSONDecodeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{input_path}:{line_no}: not a {fmt} record ({type(e).__name__}: {e})") \
            from None
  if labels is not None and len(labels) != len(out):
    raise ValueError(f"{labels_path} has {len(labels)} labels for {len(out)} questions")
  with open(output_path, "w", encoding="utf-8") as f:
    for item in out:
      f.write(json.dumps(item) + "\n")
  return len(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--format", required=True, choices=sorted(FORMATS))
  parser.add_argument("--input", required=True)
  parser.add_argument("--output", required=True)
  parser.add_argument("--labels", help="labels file (piqa, siqa)")
  args = parser.parse_args(argv)
  n = convert(args.format, args.input, args.output, args.labels)
  print(f"wrote {n} questions to {args.output}")


if __name__ == "__main__":
  main()
