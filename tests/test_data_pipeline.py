"""The Grain pipeline end to end on CPython's own text and random latents.

Contract-conforming batches of real documents; determinism; exact resume from a saved state
mid-epoch (with and without the prefetch thread); disjoint, covering process shares; start-up
errors for a config the data cannot feed.
"""

import hashlib
import json

import numpy as np
import pytest

from tfusion import batch as batch_lib
from tfusion import configlib
from tfusion.data import documents as documents_lib
from tfusion.data import pipeline, records, samples

LATENT = (8, 8, 4)  # patch 2 -> 16 patches per image
NUM_PATCHES = 16
TOPICS = samples.pydoc_topics()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  tok = samples.sample_tokenizer(str(d), vocab_size=1000)
  samples.write_text_records(str(d / "text-0.array_record"), TOPICS[:40])
  samples.write_text_records(str(d / "text-1.array_record"), TOPICS[40:])
  samples.write_image_caption_records(str(d / "images.array_record"), 60, LATENT)
  # Pre-tokenized documents whose first id is unique (to trace documents through batches).
  markers = [(f"doc{i}", [100 + i] + tok.encode(text)[:int(20 + 7 * (i % 13))])
             for i, (_, text) in enumerate(TOPICS)]
  records.write_records(str(d / "ids.array_record"),
                        (records.text_record(ids=ids, id=name) for name, ids in markers))
  return {"dir": d, "tok": tok, "text": str(d / "text-*.array_record"),
          "images": str(d / "images.array_record"), "ids": str(d / "ids.array_record")}


def make_config(data, **data_overrides):
  c = configlib.base_config()
  c.model.vocab_size = 1024
  c.model.image.latent_size, c.model.image.latent_channels = LATENT[0], LATENT[2]
  c.data.source = "grain"
  c.data.tokenizer = data["tok"].source
  c.data.text = data["text"]
  c.data.image_caption = data["images"]
  c.data.seq_len = 128
  c.data.max_images = 4
  c.data.batch_size = 4
  c.data.prefetch = 0
  c.data.pack_pool = 8
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in batch_lib.KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_follow_the_contract_and_hold_the_documents(data):
  tok = data["tok"]
  batches = take(pipeline.make_iterator(make_config(data)), 6)
  texts = [t for _, t in TOPICS]
  captions = {samples.caption_for(i) for i in range(60)}
  latents = {hashlib.sha1(r["latent"].astype(np.float32).tobytes()).hexdigest()
             for r in records.read_records(data["images"])}
  seen_text = seen_captions = 0
  for b in batches:
    batch_lib.check_batch_structure(b, latent_shape=LATENT)
    batch_lib.check_batch_values(b, num_patches=NUM_PATCHES)
    assert (b["segment_ids"] > 0).mean() > 0.97
    for r in range(b["tokens"].shape[0]):
      for m in np.flatnonzero(b["image_mask"][r]):
        assert hashlib.sha1(b["images"][r, m].tobytes()).hexdigest() in latents
      for seg in range(1, b["segment_ids"][r].max() + 1):
        where = b["segment_ids"][r] == seg
        ids = b["tokens"][r][where & (b["image_index"][r] < 0)]
        if (b["image_index"][r][where] >= 0).any():
          words = ids[(ids != tok.boi_id) & (ids != tok.eoi_id)]
          caption = tok.decode(words).strip()
          if ids[0] == tok.bos_id and ids[-1] == tok.eos_id and caption:
            assert caption in captions
            seen_captions += 1
        else:
          assert tok.decode(ids) in "\n".join(texts)  # BOS/EOS decode to nothing
          seen_text += 1
  assert seen_text > 3 and seen_captions > 10
  # Targets are the next token wherever the loss applies.
  b = batches[0]
  np.testing.assert_array_equal(b["targets"][:, :-1][b["text_loss_mask"][:, :-1]],
                                b["tokens"][:, 1:][b["text_loss_mask"][:, :-1]])


def test_caption_order_dropout_and_noise_limit(data):
  spec = pipeline.layout_spec(make_config(data), data["tok"])
  builder = documents_lib.DocumentBuilder("image_caption", data["tok"], spec)
  rec = records.read_records(data["images"])[0]
  kinds = {"caption_first": 0, "dropped": 0, "image_first": 0}
  n = 4000
  for i in range(n):
    doc = builder.build(rec, np.random.default_rng(i), "test")
    assert doc.num_images == 1
    start = int(doc.image_starts[0])
    if start == 2 and len(doc) == NUM_PATCHES + 4:
      kinds["dropped"] += 1
      assert doc.max_t[0] == 1.0
    elif start == 2:
      kinds["image_first"] += 1
      assert doc.max_t[0] == 0.5
    else:
      kinds["caption_first"] += 1
      assert doc.max_t[0] == 1.0
  expected = {"caption_first": 0.8 * 0.9, "dropped": 0.8 * 0.1, "image_first": 0.2}
  for k, p in expected.items():
    assert abs(kinds[k] / n - p) < 4 * np.sqrt(p * (1 - p) / n), (k, kinds[k] / n)


def test_same_seed_same_batches_other_seed_other_batches(data):
  a = take(pipeline.make_iterator(make_config(data)), 3)
  b = take(pipeline.make_iterator(make_config(data)), 3)
  assert_same(a, b)
  other = make_config(data)
  other.seed = 1
  c = take(pipeline.make_iterator(other), 1)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restore_mid_epoch_gives_the_identical_next_batches(data, prefetch):
  config = make_config(data, prefetch=prefetch)
  it = pipeline.make_iterator(config)
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  pools = [e for s in pipeline._find_states(state) for pool in s["pools"] for e in pool]
  assert any(offset > 0 for _, offset in pools), "no document is open mid-way: weak test"
  expected = take(it, 4)
  resumed = pipeline.make_iterator(config)
  resumed.set_state(state)
  assert_same(take(resumed, 4), expected)
  # Restoring an iterator that already ran ahead also rewinds it.
  resumed.set_state(state)
  assert_same(take(resumed, 2), expected[:2])


def _text_doc_markers(batches, bos):
  """First id after each BOS of a text document (cut tails carry no BOS: one per document)."""
  out = []
  for b in batches:
    tokens, seg = b["tokens"], b["segment_ids"]
    for r, q in zip(*np.nonzero((tokens == bos) & (b["positions"] == 0))):
      if (b["image_index"][r][seg[r] == seg[r, q]] < 0).all():
        out.append(int(tokens[r, q + 1]))
  return out


def _record_order(config, tok, epochs=2):
  """Record numbers (marker - 100) in the order the text source hands documents to the packer."""
  _, _, datasets, _, _ = pipeline.build_sources(config, tokenizer=tok)
  return [int(datasets[0][i].tokens[1]) - 100 for i in range(epochs * len(TOPICS))]


def test_records_are_shuffled_per_epoch_and_per_seed(data):
  n = len(TOPICS)
  config = make_config(data, text=data["ids"], image_caption="")
  order = _record_order(config, data["tok"])
  first, second = order[:n], order[n:]
  assert sorted(first) == sorted(second) == list(range(n)), "each epoch reads every record once"
  assert first != list(range(n)), "not shuffled"
  assert first != second, "the same order every epoch"
  # The order is a function of the seed.
  assert _record_order(make_config(data, text=data["ids"], image_caption=""), data["tok"]) == order
  other = make_config(data, text=data["ids"], image_caption="")
  other.seed = 1
  other_order = _record_order(other, data["tok"])
  assert other_order[:n] != first and other_order[n:] != second
  # ...and batches follow it: the documents packed first are the first records read.
  batches = take(pipeline.make_iterator(config), 3)
  packed = _text_doc_markers(batches, data["tok"].bos_id)
  assert len(packed) > 4 and {m - 100 for m in packed} <= set(first[:len(packed) + 8])


@pytest.mark.parametrize("processes", [2, 3])
def test_process_shares_are_disjoint_and_cover_each_epoch(data, processes):
  config = make_config(data, text=data["ids"], num_epochs=1, batch_size=6)
  bos = data["tok"].bos_id
  markers, image_hashes = [], []
  for p in range(processes):
    batches = list(pipeline.make_iterator(config, process_index=p, process_count=processes))
    assert all(b["tokens"].shape[0] == 6 // processes for b in batches)
    mine = _text_doc_markers(batches, bos)
    markers.extend(mine)
    hashes = [hashlib.sha1(b["images"][r, m].tobytes()).hexdigest()
              for b in batches for r, m in zip(*np.nonzero(b["image_mask"]))]
    image_hashes.extend(hashes)
    assert mine and hashes
  assert sorted(markers) == [100 + i for i in range(len(TOPICS))]
  assert len(image_hashes) == len(set(image_hashes)) == 60


def test_interleaved_documents_keep_every_image_once_and_whole(data, tmp_path):
  rng = np.random.default_rng(3)
  texts = [t for _, t in TOPICS[:30]]
  docs, latents = [], []
  for i in range(12):  # up to 6 images: more than M=4 slots, so some documents are cut
    segs = []
    for j in range(int(rng.integers(1, 7))):
      segs.append(texts[(3 * i + j) % 30][:int(rng.integers(20, 300))])
      latents.append(rng.standard_normal(LATENT).astype(np.float16))
      segs.append(latents[-1])
    if i % 2:
      segs.append(texts[i][:100])
    docs.append(records.interleaved_record(segs, id=f"il{i}"))
  path = str(tmp_path / "il.array_record")
  records.write_records(path, docs)
  config = make_config(data, text="", image_caption="", interleaved=path, num_epochs=1)
  batches = list(pipeline.make_iterator(config))
  hashes = []
  for b in batches:
    batch_lib.check_batch_values(b, num_patches=NUM_PATCHES)  # spans whole, slots consistent
    hashes += [hashlib.sha1(b["images"][r, m].tobytes()).hexdigest()
               for r, m in zip(*np.nonzero(b["image_mask"]))]
    assert (b["image_max_t"][b["image_mask"]] == 1.0).all()
  want = [hashlib.sha1(x.astype(np.float32).tobytes()).hexdigest() for x in latents]
  assert sorted(hashes) == sorted(want)
  bos = data["tok"].bos_id
  starts = sum(int(((b["tokens"] == bos) & (b["positions"] == 0)).sum()) for b in batches)
  assert starts == len(docs)


def test_resume_state_from_another_process_layout_is_an_error(data):
  config = make_config(data, batch_size=4)
  it = pipeline.make_iterator(config, process_index=0, process_count=2)
  next(it)
  state = it.get_state()
  other = pipeline.make_iterator(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process 0 of 2"):
    other.set_state(state)


def test_startup_errors_name_the_problem(data, tmp_path):
  ok = make_config(data)
  cases = [
      (dict(tokenizer=""), ValueError, "config.data.tokenizer"),
      (dict(tokenizer=str(tmp_path / "none.model")), FileNotFoundError, "none.model"),
      (dict(text=str(tmp_path / "missing-*.array_record")), FileNotFoundError,
       "config.data.text"),
      (dict(image_caption=str(tmp_path)), FileNotFoundError, "config.data.image_caption"),
      (dict(text="", image_caption=""), ValueError, "at least one of"),
      (dict(seq_len=16), ValueError, "config.data.seq_len=16"),
      (dict(max_images=0), ValueError, "max_images"),
      (dict(batch_size=5), ValueError, "batch_size=5"),
      (dict(caption_dropout=1.5), ValueError, "config.data.caption_dropout=1.5"),
      (dict(on_bad_record="ignore"), ValueError, "config.data.on_bad_record"),
      (dict(split_text="never"), ValueError, "config.data.split_text"),
  ]
  empty = tmp_path / "sub" / "empty.array_record"
  records.write_records(str(empty), [])
  cases.append((dict(text=str(empty), image_caption=""), ValueError, "hold no records"))
  for overrides, error, match in cases:
    config = make_config(data, **overrides)
    with pytest.raises(error, match=match):
      pipeline.make_iterator(config, process_count=2 if "batch_size" in overrides else 1)
  small_vocab = make_config(data)
  small_vocab.model.vocab_size = 512
  with pytest.raises(ValueError, match="config.model.vocab_size=512"):
    pipeline.make_iterator(small_vocab)
  other_latent = make_config(data)
  other_latent.model.image.latent_channels = 8
  with pytest.raises(ValueError, match="latent_channels=8"):
    pipeline.make_iterator(other_latent)
  assert next(pipeline.make_iterator(ok))["tokens"].shape == (4, 128)
