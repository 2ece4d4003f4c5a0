"""tfusion-make-text-records: .txt / .jsonl / .parquet -> text records that the Grain pipeline
reads back document for document; skips named and counted; old shards never clobbered."""

import json
import os

import pytest

from tfusion import configlib
from tfusion.data import make_text_records as mtr
from tfusion.data import pipeline, records, samples


def _read_all(out):
  source = records.RecordSource(records.resolve_paths(str(out), "config.data.text"))
  return [records.decode_record(source[i].data, where=source[i].where)
          for i in range(len(source))]


@pytest.fixture
def corpus(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  (d / "a.txt").write_text("First doc,\nline two.\n\n\n\nSecond doc.\n  \nThird doc.\n")
  (d / "b.jsonl").write_text("\n".join([
      json.dumps({"text": "Fourth doc."}), "{not json", json.dumps({"body": "no text key"}),
      json.dumps({"text": "   "}), json.dumps({"text": "Fifth doc.", "meta": 1})]) + "\n")
  return d


def test_txt_and_jsonl_round_trip_through_the_pipeline(corpus, tmp_path, capsys):
  out = tmp_path / "out"
  mtr.main(["--input", str(corpus), "--out", str(out), "--shard_size", "2"])
  printed = capsys.readouterr().out
  assert "wrote 5 text records in 3 shards" in printed
  assert f"skipped (not JSON, 1x): {corpus / 'b.jsonl'}:2" in printed
  assert f"skipped (no string 'text' field, 1x): {corpus / 'b.jsonl'}:3" in printed
  assert f"skipped (empty document, 1x): {corpus / 'b.jsonl'}:4" in printed
  got = _read_all(out)
  assert [r["text"] for r in got] == ["First doc,\nline two.", "Second doc.", "Third doc.",
                                      "Fourth doc.", "Fifth doc."]
  assert got[1]["id"] == f"{corpus / 'a.txt'}:6" and all(r["kind"] == "text" for r in got)

  # The training pipeline packs every document once (one epoch, no shuffle).
  tok = samples.sample_tokenizer(str(tmp_path / "tok"), vocab_size=400)
  c = configlib.base_config()
  c.model.vocab_size = 512
  c.data.update(dict(source="grain", text=str(out), tokenizer=tok.source, seq_len=64,
                     batch_size=2, prefetch=0, num_epochs=1, shuffle=False))
  batches = list(pipeline.make_iterator(c))
  docs = sum(int(b["segment_ids"][r].max()) for b in batches for r in range(len(b["tokens"])))
  assert docs == 5
  packed = [tok.decode([int(t) for t, s in zip(b["tokens"][r], b["segment_ids"][r]) if s])
            for b in batches for r in range(len(b["tokens"]))]
  assert "Fourth doc." in " ".join(packed)


def test_one_document_per_txt_file_and_custom_key(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  (d / "x.txt").write_text("para one\n\npara two\n")
  (d / "y.jsonl").write_text(json.dumps({"content": "from content"}) + "\n")
  mtr.main(["--input", f"{d / 'x.txt'},{d}/*.jsonl", "--out", str(tmp_path / "o"),
            "--txt_docs", "file", "--text_key", "content"])
  assert [r["text"] for r in _read_all(tmp_path / "o")] == ["para one\n\npara two",
                                                           "from content"]


def test_parquet_column(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["row zero", None, "row two"], "n": [0, 1, 2]}),
                 str(tmp_path / "t.parquet"))
  summary = mtr.make_text_records([str(tmp_path / "t.parquet")], str(tmp_path / "o"),
                                  show_progress=False)
  assert summary["skipped"] == {"no string 'text' field": 1}
  assert summary["examples"]["no string 'text' field"] == [f"{tmp_path / 't.parquet'}:row 1"]
  assert [r["text"] for r in _read_all(tmp_path / "o")] == ["row zero", "row two"]
  with pytest.raises(ValueError, match="no column 'body'"):
    mtr.make_text_records([str(tmp_path / "t.parquet")], str(tmp_path / "o2"), text_key="body",
                          show_progress=False)


def test_bad_inputs_are_one_line_and_nothing_is_lost(corpus, tmp_path, capsys):
  out = tmp_path / "out"
  mtr.main(["--input", str(corpus / "a.txt"), "--out", str(out)])
  before = {f: (out / f).read_bytes() for f in os.listdir(out)}
  capsys.readouterr()

  def fails(*args):
    with pytest.raises(SystemExit) as e:
      mtr.main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]

  assert "holds text records of another run (inputs changed)" in fails(
      "--input", str(corpus), "--out", str(out))
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
  assert "missing.txt" in fails("--input", str(tmp_path / "missing.txt"), "--out", str(out))
  (tmp_path / "latin1.txt").write_bytes("a good doc\n\ncaf\xe9\n".encode("latin-1"))
  assert "latin1.txt: line 3 is not UTF-8" in fails("--input", str(tmp_path / "latin1.txt"),
                                                   "--out", str(tmp_path / "o2"))
  assert not mtr.existing_shards(str(tmp_path / "o2"))  # no half shard left behind
  # --overwrite replaces the old shards.
  mtr.main(["--input", str(corpus / "b.jsonl"), "--out", str(out), "--overwrite"])
  assert [r["text"] for r in _read_all(out)] == ["Fourth doc.", "Fifth doc."]


def test_rerun_resumes_by_input_file_and_hosts_split_the_files(corpus, tmp_path, capsys):
  (corpus / "c.jsonl").write_text("\n".join(json.dumps({"text": f"doc c{i}"}) for i in range(5)))
  files = mtr.input_files(str(corpus))
  mtr.make_text_records(files, str(tmp_path / "one"), shard_size=2, show_progress=False)
  want = [r["text"] for r in _read_all(tmp_path / "one")]
  assert len(want) == 10
  # Two hosts: each writes the files F with F % 2 == its index; together the same records.
  both = tmp_path / "two"
  parts = [mtr.make_text_records(files, str(both), shard_size=2, show_progress=False,
                                 process_index=p, process_count=2) for p in (0, 1)]
  assert [p["written"] for p in parts] == [3 + 5, 2]  # a.txt + c.jsonl on host 0, b.jsonl on 1
  assert [r["text"] for r in _read_all(both)] == want
  # A run cut short inside c.jsonl (its marker never written, a half shard left): the rerun
  # keeps a.txt and b.jsonl and writes c.jsonl again, nothing twice.
  out = tmp_path / "one"
  os.remove(out / "text-00002.done.json")
  os.remove(out / "text-00002-0002.array_record")
  (out / "text-00002-0001.array_record").write_bytes(b"half")
  (out / "text-00002-0007.array_record.tmp").write_bytes(b"being written when killed")
  a_txt = (out / "text-00000-0000.array_record").stat().st_mtime_ns
  mtr.main(["--input", str(corpus), "--out", str(out), "--shard_size", "2"])
  assert ("wrote 10 text records in 6 shards to "
          f"{out} (2 input files were already done)") in capsys.readouterr().out
  assert (out / "text-00000-0000.array_record").stat().st_mtime_ns == a_txt
  assert not list(out.glob("*.tmp"))
  assert [r["text"] for r in _read_all(out)] == want
  # Another shard size is another run: refused in one line.
  with pytest.raises(ValueError, match=r"another run \(shard_size changed\)"):
    mtr.make_text_records(files, str(out), shard_size=3, show_progress=False)
