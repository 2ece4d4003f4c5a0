"""Record schema: round trips, and every kind of malformed record is an error naming file and
record index, or (on_bad_record="skip") is skipped, counted and logged."""

import logging
import re

import msgpack
import numpy as np
import pytest

from tfusion import configlib
from tfusion.data import pipeline, records, samples

LATENT = (8, 8, 4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return samples.sample_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=1000)


def test_records_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  lat16 = rng.standard_normal(LATENT).astype(np.float16)
  lat32 = rng.standard_normal(LATENT).astype(np.float32)
  written = [
      records.text_record("Some text.\nMore text.", id="a"),
      records.text_record(ids=[5, 6, 7]),
      records.image_caption_record(lat16, "a caption", id="img-1"),
      records.image_caption_record(lat32, "another"),
      records.interleaved_record(["before", lat16, "after", lat32, np.array([9, 10])]),
  ]
  path = str(tmp_path / "r.array_record")
  assert records.write_records(path, written) == 5
  got = records.read_records(path)
  assert got[0] == {"kind": "text", "text": "Some text.\nMore text.", "id": "a"}
  np.testing.assert_array_equal(got[1]["ids"], [5, 6, 7])
  assert got[2]["latent"].dtype == np.float16 and got[2]["caption"] == "a caption"
  np.testing.assert_array_equal(got[2]["latent"], lat16)
  assert got[3]["latent"].dtype == np.float32
  np.testing.assert_array_equal(got[3]["latent"], lat32)
  segs = got[4]["segments"]
  assert [next(iter(s)) for s in segs] == ["text", "latent", "text", "latent", "ids"]
  np.testing.assert_array_equal(segs[3]["latent"], lat32)
  assert not (tmp_path / "r.array_record.tmp").exists()


def test_writer_refuses_bad_records_and_leaves_no_file(tmp_path):
  path = tmp_path / "w.array_record"
  with pytest.raises(records.BadRecordError, match="caption is empty"):
    with records.RecordWriter(str(path)) as w:
      w.write(records.image_caption_record(np.zeros(LATENT), "ok"))
      w.write(records.image_caption_record(np.zeros(LATENT), "   "))
  assert not path.exists() and not (tmp_path / "w.array_record.tmp").exists()


def _array(a):
  a = np.asarray(a)
  return {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tobytes()}


def _raw(rec):
  return msgpack.packb(rec, use_bin_type=True)


def _image(latent, caption="a fine caption", **extra):
  return _raw(dict({"kind": "image_caption", "latent": _array(latent), "caption": caption},
                   **extra))


GOOD = np.zeros(LATENT, np.float16)
NAN = GOOD.copy()
NAN[1, 2, 3] = np.nan
INF = GOOD.astype(np.float32)
INF[0, 0, 0] = np.inf

BAD_IMAGE_RECORDS = {
    "undecodable": b"\xc1 this is not msgpack",
    "not_a_map": _raw([1, 2, 3]),
    "latent_shape": _image(np.zeros((4, 4, 4), np.float16)),
    "dtype": _image(np.zeros(LATENT, np.int8)),
    "dtype64": _image(np.zeros(LATENT, np.float64)),
    "truncated": _raw({"kind": "image_caption", "caption": "x",
                       "latent": dict(_array(GOOD), data=b"\0" * 10)}),
    "nan": _image(NAN),
    "inf": _image(INF),
    "empty_caption": _image(GOOD, caption=" \n"),
    "unknown_keys": _image(GOOD, extra_key=1),
    "wrong_kind": _raw({"kind": "text", "text": "a text record among images"}),
    "no_kind": _raw({"latent": _array(GOOD), "caption": "x"}),
    # Array maps numpy itself would choke on (must still name the record, and be skippable).
    "object_dtype": _raw({"kind": "image_caption", "caption": "x",
                          "latent": {"dtype": "object", "shape": [2], "data": b"\0" * 16}}),
    "huge_shape": _raw({"kind": "image_caption", "caption": "x",
                        "latent": {"dtype": "float16", "shape": [2**32, 2**32], "data": b""}}),
    "bool_shape": _raw({"kind": "image_caption", "caption": "x",
                        "latent": {"dtype": "float16", "shape": [True, 1, 1], "data": b"\0\0"}}),
    "big_endian": _raw({"kind": "image_caption", "caption": "x",
                        "latent": dict(_array(GOOD.astype(">f4")), dtype=">f4")}),
}
MESSAGES = {
    "undecodable": "undecodable", "not_a_map": "must be a map",
    "latent_shape": r"shape \[4, 4, 4\].*latent_size=8", "dtype": "dtype int8",
    "dtype64": "dtype float64", "truncated": "holds 10 bytes", "nan": "NaN or Inf",
    "inf": "NaN or Inf", "empty_caption": "caption is empty", "unknown_keys": "extra_key",
    "wrong_kind": "'text' record in a 'image_caption' source", "no_kind": "unknown kind",
    "object_dtype": r"dtype \|O", "huge_shape": "holds 0 bytes", "bool_shape": "malformed shape",
    "big_endian": "dtype >f4",
}


def _config(tok, **data):
  c = configlib.base_config()
  c.model.vocab_size = 1024
  c.model.image.latent_size, c.model.image.latent_channels = LATENT[0], LATENT[2]
  settings = dict(source="grain", tokenizer=tok.source, seq_len=128, max_images=4,
                  batch_size=2, prefetch=0, num_epochs=1)
  c.data.update(dict(settings, **data))
  return c


def _write_with_bad(path, bad, good_count=7, bad_at=3):
  rng = np.random.default_rng(1)
  with records.RecordWriter(str(path)) as w:
    for i in range(good_count):
      if i == bad_at:
        w.write(bad)
      latent = rng.standard_normal(LATENT).astype(np.float16)
      w.write(records.image_caption_record(latent, samples.caption_for(i)))


@pytest.mark.parametrize("case", sorted(BAD_IMAGE_RECORDS))
def test_bad_record_is_an_error_naming_file_and_index(tok, tmp_path, case):
  path = tmp_path / f"{case}.array_record"
  _write_with_bad(path, BAD_IMAGE_RECORDS[case])
  it = pipeline.make_iterator(_config(tok, image_caption=str(path)))
  with pytest.raises(records.BadRecordError) as e:
    list(it)
  assert f"{path}: record 3: " in str(e.value)
  assert e.value.where == f"{path}: record 3"
  assert re.search(MESSAGES[case], str(e.value)), str(e.value)


SKIP_CODES = {"undecodable": "undecodable", "latent_shape": "latent_shape", "nan": "nonfinite",
              "empty_caption": "empty_caption", "unknown_keys": "unknown_keys",
              "object_dtype": "dtype", "huge_shape": "malformed"}


@pytest.mark.parametrize("case", sorted(SKIP_CODES))
def test_skip_mode_skips_counts_and_logs(tok, tmp_path, case, caplog):
  path = tmp_path / f"{case}.array_record"
  _write_with_bad(path, BAD_IMAGE_RECORDS[case])
  it = pipeline.make_iterator(_config(tok, image_caption=str(path), on_bad_record="skip"))
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  assert sum(int(b["image_mask"].sum()) for b in batches) == 7  # every good record, once
  metrics = it.metrics()
  assert metrics["data/skipped_records"] == 1
  assert metrics[f"data/skipped_{SKIP_CODES[case]}"] == 1
  assert f"{path}: record 3" in caplog.text


def test_bad_pretokenized_text_names_the_problem(tok, tmp_path):
  path = tmp_path / "ids.array_record"
  records.write_records(str(path), [records.text_record(ids=[10, 11, 12]),
                                    records.text_record(ids=[10, 5000])])
  with pytest.raises(records.BadRecordError, match=r"record 1: ids holds id 5000 >= "):
    list(pipeline.make_iterator(_config(tok, text=str(path))))
  path2 = tmp_path / "ids2.array_record"
  records.write_records(str(path2), [records.text_record(ids=[10, tok.boi_id, 12])])
  with pytest.raises(records.BadRecordError, match=r"record 0: ids holds the special id 3"):
    list(pipeline.make_iterator(_config(tok, text=str(path2))))


def test_a_source_of_only_bad_records_stops_with_an_error(tok, tmp_path):
  path = tmp_path / "all_bad.array_record"
  with records.RecordWriter(str(path)) as w:
    for _ in range(5):
      w.write(BAD_IMAGE_RECORDS["nan"])
  it = pipeline.make_iterator(_config(tok, image_caption=str(path), on_bad_record="skip",
                                      num_epochs=0))
  with pytest.raises(ValueError, match="were all bad"):
    next(it)


def test_not_an_array_record_file_is_a_startup_error(tok, tmp_path):
  path = tmp_path / "junk.array_record"
  path.write_bytes(b"definitely not an array record file" * 10)
  with pytest.raises(ValueError, match="junk.array_record is not a readable ArrayRecord"):
    pipeline.make_iterator(_config(tok, text=str(path)))
