"""tfusion-precompute-latents from web-scale inputs: webdataset tar shards (with bad members and
a truncated tar), HF-style parquet, COCO/Karpathy captions (with eval references), resume and
refusal, a job split over processes, and all-bad input as an error."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from tfusion import vae as vae_lib
from tfusion.data import ingest_sources, precompute, records

RES = 16
TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)


def _png(seed, fmt="PNG"):
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _tar(path, samples, truncate_to=None):
  """Writes a tar of {key.ext: bytes} samples (optionally cut to `truncate_to` bytes)."""
  with tarfile.open(path, "w") as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  if truncate_to is not None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:truncate_to(data)])


@pytest.fixture(scope="module")
def d(tmp_path_factory):
  d = tmp_path_factory.mktemp("ingest")
  vae_lib.save_vae(vae_lib.init_vae(TINY_VAE, seed=0), str(d / "vae"))
  tars = d / "tars"
  tars.mkdir()
  txt = str.encode
  _tar(tars / "shard-00000.tar", [
      ("000000", {"png": _png(0), "txt": txt("a red square")}),
      ("000001", {"png": _png(1), "txt": txt("a blue square")}),
      ("000002", {"png": _png(2), "txt": txt("a green square")}),
      ("000003", {"png": b"not an image", "txt": txt("broken")}),
      ("000004", {"jpg": _png(4, "JPEG"), "json": txt(json.dumps({"caption": "from json"}))}),
      ("000005", {"txt": txt("no image here")})])
  _tar(tars / "shard-00001.tar", [
      ("000006", {"png": _png(6), "txt": txt("six")}),
      ("000007", {"png": _png(7), "json": txt(json.dumps({"url": "x"}))}),
      ("000008", {"png": _png(8), "txt": txt("   ")})])
  # Cut inside 000010's image: 000009 survives, the rest is one "corrupt tar" skip.
  _tar(tars / "shard-00002.tar", [
      ("000009", {"png": _png(9), "txt": txt("nine")}),
      ("000010", {"png": _png(10), "txt": txt("ten")})],
      truncate_to=lambda data: data.index(_png(10)) + 40)
  return d


WANT_CAPTIONS = ["a red square", "a blue square", "a green square", "from json", "six", "nine"]


def test_tar_listing_notices_damage_tarfile_passes_over(tmp_path):
  """tarfile stops quietly at a bad header after the first, or at a cut between members."""
  samples = [(f"{i:03d}", {"png": _png(i), "txt": b"x"}) for i in range(3)]
  _tar(tmp_path / "ok.tar", samples)
  groups, error = ingest_sources.list_tar_samples(tmp_path / "ok.tar")
  assert [k for k, _ in groups] == ["000", "001", "002"] and error is None
  data = (tmp_path / "ok.tar").read_bytes()
  with tarfile.open(tmp_path / "ok.tar") as tar:
    second = [m for m in tar][2].offset  # header of 001.png
  (tmp_path / "bad_header.tar").write_bytes(data[:second] + b"garbage!" * 64
                                            + data[second + 512:])
  (tmp_path / "cut.tar").write_bytes(data[:second])  # no end-of-archive blocks
  for name in ("bad_header.tar", "cut.tar"):
    groups, error = ingest_sources.list_tar_samples(tmp_path / name)
    assert [k for k, _ in groups] == ["000"] and error, name
  (tmp_path / "empty.tar").write_bytes(b"")
  assert ingest_sources.list_tar_samples(tmp_path / "empty.tar")[1]


def _shards(out):
  return sorted(f for f in os.listdir(out) if f.startswith("image_caption-"))


def _tar_run(d, out, *extra, tars=None):
  precompute.main(["--vae", str(d / "vae"), "--out", str(out), "--webdataset",
                   str(tars or d / "tars"), "--resolution", str(RES), "--batch_size", "4",
                   "--shard_size", "4", *extra])


@pytest.fixture(scope="module")
def tar_out(d):
  out = d / "tar_out"
  _tar_run(d, out)
  return out


def test_tar_shards_skip_bad_members_by_reason(d, tar_out, capsys):
  _tar_run(d, tar_out)  # finished: reports the same counts from the shards' .json files
  printed = capsys.readouterr().out
  assert "wrote 6 image–caption records in 3 shards" in printed
  assert ("skipped 5 (corrupt tar: 1, empty caption: 1, missing caption: 1, missing image: 1, "
          "unreadable image: 1)") in printed
  assert "skipped (unreadable image, 1x): shard-00000.tar:000003" in printed
  assert "skipped (missing image, 1x): shard-00000.tar:000005" in printed
  assert "skipped (missing caption, 1x): shard-00001.tar:000007" in printed
  assert "skipped (corrupt tar, 1x): shard-00002.tar (after 1 samples" in printed
  got = [r for f in _shards(tar_out) if f.endswith(records.EXTENSION)
         for r in records.read_records(str(tar_out / f))]
  assert [r["caption"] for r in got] == WANT_CAPTIONS
  assert got[0]["id"] == "shard-00000.tar:000000" and got[0]["latent"].shape == (8, 8, 4)


def test_rerun_redoes_a_lost_shard_and_refuses_a_changed_tar(d, tar_out, tmp_path, capsys):
  out = tmp_path / "out"
  _tar_run(d, out)
  shards = [f for f in _shards(out) if f.endswith(records.EXTENSION)]
  data = {f: (out / f).read_bytes() for f in _shards(out)}
  before = {f: os.stat(out / f).st_mtime_ns for f in shards}
  os.remove(out / shards[1])
  capsys.readouterr()
  _tar_run(d, out)
  assert "(2 shards were already done)" in capsys.readouterr().out
  assert {f: (out / f).read_bytes() for f in _shards(out)} == data
  assert [r["caption"] for f in shards for r in records.read_records(str(out / f))] == \
      WANT_CAPTIONS
  for f in (shards[0], shards[2]):
    assert os.stat(out / f).st_mtime_ns == before[f]
  # A tar rewritten with one caption edited (same samples, same padded file size): refused,
  # in one line.
  changed = tmp_path / "tars"
  changed.mkdir()
  for name in sorted(os.listdir(d / "tars")):
    (changed / name).write_bytes((d / "tars" / name).read_bytes())
  with tarfile.open(d / "tars" / "shard-00001.tar") as tar:
    samples = [(m.name, tar.extractfile(m).read()) for m in tar]
  with tarfile.open(changed / "shard-00001.tar", "w") as tar:
    for name, data in samples:
      data = b"sixty" if data == b"six" else data
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  assert os.path.getsize(changed / "shard-00001.tar") == os.path.getsize(
      d / "tars" / "shard-00001.tar")
  with pytest.raises(SystemExit) as e:
    _tar_run(d, out, tars=changed)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert err[0].endswith("tar members (names or sizes) changed. Use --overwrite (overwrite=True)"
                         " to delete them and encode again, or another --out")


def test_two_processes_write_the_shards_of_one(d, tar_out, tmp_path, capsys):
  out = tmp_path / "split"
  _tar_run(d, out, "--process_index", "0", "--process_count", "2")
  assert "wrote 4 image–caption records in 2 of 3 shards" in capsys.readouterr().out
  assert [f for f in _shards(out) if f.endswith(records.EXTENSION)] == [
      "image_caption-00000-of-00003.array_record", "image_caption-00002-of-00003.array_record"]
  _tar_run(d, out, "--process_index", "1", "--process_count", "2")
  assert {f: (out / f).read_bytes() for f in _shards(out)} == {
      f: (tar_out / f).read_bytes() for f in _shards(tar_out)}


def test_a_process_other_than_0_waits_for_a_matching_manifest(d, tmp_path):
  items = ingest_sources.WebDatasetItems(str(d / "tars"))
  vae = vae_lib.load_vae(str(d / "vae"))
  with pytest.raises(ValueError, match="process 0 wrote no matching"):
    precompute.precompute(items, vae, str(tmp_path / "o"), resolution=RES, shard_size=4,
                          process_index=1, process_count=2, manifest_wait_s=0.2,
                          show_progress=False)


def test_all_items_bad_is_an_error_exit(d, tmp_path, capsys):
  bad = tmp_path / "bad.tar"
  _tar(bad, [("a", {"png": b"junk", "txt": b"x"}), ("b", {"txt": b"y"})])
  with pytest.raises(SystemExit) as e:
    _tar_run(d, tmp_path / "o", tars=bad)
  err = capsys.readouterr().err
  assert e.value.code != 0
  assert "every one of the 2 items was skipped" in err
  assert "missing image: 1 (bad.tar:b)" in err and "unreadable image: 1 (bad.tar:a)" in err


def test_parquet_hf_image_struct_and_binary_columns(d, tmp_path, capsys):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  images = [{"bytes": _png(i), "path": f"{i}.png"} for i in range(5)]
  images[2] = {"bytes": None, "path": "elsewhere.png"}  # HF: image stored by path only
  captions = ["p0", "p1", "p2", None, "p4"]
  pq.write_table(pa.table({"image": images, "caption": captions}), tmp_path / "a.parquet",
                 row_group_size=2)
  pq.write_table(pa.table({"jpg": [_png(9), b"garbage"], "text": ["q0", "q1"]}),
                 tmp_path / "b.parquet")
  out = tmp_path / "pq"
  base = ["--vae", str(d / "vae"), "--resolution", str(RES), "--batch_size", "2",
          "--shard_size", "3"]
  precompute.main(base + ["--out", str(out), "--parquet", str(tmp_path / "a.parquet")])
  printed = capsys.readouterr().out
  assert "skipped (missing image, 1x): a.parquet:row 2" in printed
  assert "skipped (missing caption, 1x): a.parquet:row 3" in printed
  got = [r for f in _shards(out) if f.endswith(records.EXTENSION)
         for r in records.read_records(str(out / f))]
  assert [(r["id"], r["caption"]) for r in got] == [
      ("a.parquet:row 0", "p0"), ("a.parquet:row 1", "p1"), ("a.parquet:row 4", "p4")]
  precompute.main(base + ["--out", str(tmp_path / "pq2"), "--parquet",
                          str(tmp_path / "b.parquet"), "--image_column", "jpg"])
  assert "wrote 1 image–caption records" in capsys.readouterr().out  # caption from 'text'
  # A file without the columns: one error naming it and its columns, nothing encoded.
  pq.write_table(pa.table({"img": [b"x"], "label": [3]}), tmp_path / "c.parquet")
  with pytest.raises(SystemExit):
    precompute.main(base + ["--out", str(tmp_path / "pq3"), "--parquet",
                            f"{tmp_path / 'a.parquet'},{tmp_path / 'c.parquet'}"])
  err = capsys.readouterr().err
  assert "c.parquet has no column 'image', 'caption' or 'text'" in err
  assert "['img', 'label']" in err and not (tmp_path / "pq3").exists()


def test_coco_karpathy_split_with_eval_references(d, tmp_path, capsys):
  from tfusion.evaluate import suites
  folder = tmp_path / "coco" / "val2014"
  folder.mkdir(parents=True)
  names = [f"COCO_val2014_{i:012d}.jpg" for i in range(4)]
  for i, n in enumerate(names):
    (folder / n).write_bytes(_png(i, "JPEG"))
  caps = {i: [f"image {i} caption {k}" for k in range(2 + i % 2)] for i in range(4)}
  coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
          "annotations": [{"image_id": i, "id": 10 * i + k, "caption": c}
                          for i in caps for k, c in enumerate(caps[i])]}
  split = ["test", "test", "train", "val"]
  karpathy = {"images": [{"filepath": "val2014", "filename": n, "split": split[i], "cocoid": i,
                          "sentences": [{"raw": "karpathy raw"}]} for i, n in enumerate(names)]}
  (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
  (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
  out = tmp_path / "coco_out"
  precompute.main(["--vae", str(d / "vae"), "--out", str(out), "--images",
                   str(tmp_path / "coco"), "--coco", str(tmp_path / "captions_val2014.json"),
                   "--karpathy", str(tmp_path / "dataset_coco.json"), "--split", "test",
                   "--resolution", str(RES), "--batch_size", "4", "--shard_size", "4"])
  assert "wrote 5 image–caption records" in capsys.readouterr().out  # 2 + 3 captions
  refs = ingest_sources.read_references(str(out / "references.jsonl"))
  assert refs == {f"val2014/{names[0]}": caps[0], f"val2014/{names[1]}": caps[1]}
  # The caption suite reads the records themselves: one image, all its references.
  loaded = suites.load_caption_references(str(out), max_images=10)
  assert sorted(r for _, r in loaded) == sorted(refs.values())
  assert all(lat.shape == (8, 8, 4) for lat, _ in loaded)
  prompts = suites.sample_prompts(str(out / "prompts.jsonl"), 10, seed=0)
  assert sorted(prompts) == [caps[0][0], caps[1][0]]
  # The whole annotation file, no split: one record per caption of every image.
  items, _, images = ingest_sources.coco_items(str(folder), str(tmp_path /
                                                                "captions_val2014.json"))
  assert len(items) == sum(len(c) for c in caps.values()) and len(images) == 4
