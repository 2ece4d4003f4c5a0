"""tfusion-precompute-latents: folder + captions (and a TFDS-like source) -> latent shards that
match the VAE, survive a rerun (finished shards skipped), count what they skip, and feed the
pipeline."""

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tfusion import batch as batch_lib
from tfusion import configlib
from tfusion import vae as vae_lib
from tfusion.data import pipeline, precompute, records, samples
from tfusion.vae import images as images_lib

RES = 16
TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=8)  # 2x downsampling: 16x16 images -> 8x8x4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("pre")
  vae_dir = str(d / "vae")
  vae_lib.save_vae(vae_lib.init_vae(TINY_VAE, seed=0), vae_dir)
  folder = d / "images"
  folder.mkdir()
  names = ["astronaut", "camera", "coffee", "chelsea", "rocket"]
  for n in names:  # sizes and modes differ: RGB, grayscale, non-square
    Image.fromarray(getattr(skimage.data, n)()).save(folder / f"{n}.png")
  (folder / "broken.png").write_bytes(b"not a png at all")
  lines = [{"file": f"{n}.png", "caption": f"a picture called {n}"} for n in names]
  lines.insert(2, {"file": "broken.png", "caption": "unreadable"})
  lines.insert(4, {"file": "gone.png", "caption": "a missing file"})
  lines.append({"file": "camera.png", "caption": "   "})
  lines.append({"file": "astronaut.png", "caption": "the same image, another caption"})
  captions = d / "captions.jsonl"
  captions.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return {"dir": d, "vae": vae_dir, "folder": str(folder), "captions": str(captions),
          "names": names}


def _run(setup, out, *extra):
  precompute.main(["--vae", setup["vae"], "--out", str(out), "--images", setup["folder"],
                   "--captions", setup["captions"], "--resolution", str(RES), "--batch_size", "3",
                   "--shard_size", "3", *extra])


def _shards(out):
  return sorted(f for f in os.listdir(out) if f.endswith(records.EXTENSION))


def test_folder_to_shards_matches_the_vae_and_reports_skips(setup, tmp_path, capsys):
  out = tmp_path / "out"
  _run(setup, out)
  printed = capsys.readouterr().out
  assert "wrote 6 image–caption records in 3 shards" in printed
  assert ("skipped 3 (empty caption: 1, missing image file: 1, unreadable image: 1)"
          in printed)
  assert _shards(out) == [f"image_caption-{s:05d}-of-00003.array_record" for s in range(3)]
  got = [r for f in _shards(out) for r in records.read_records(str(out / f))]
  assert [r["caption"] for r in got] == [f"a picture called {n}" for n in setup["names"]] + [
      "the same image, another caption"]
  vae = vae_lib.load_vae(setup["vae"])
  images = np.stack([images_lib.load_image(os.path.join(setup["folder"], f"{n}.png"), RES)
                     for n in setup["names"]])
  want = np.asarray(vae.encode(images))
  for r, w in zip(got, want):
    assert r["latent"].dtype == np.float16 and r["latent"].shape == (8, 8, 4)
    np.testing.assert_allclose(r["latent"].astype(np.float32), w, atol=2e-3 * np.abs(w).max())
  np.testing.assert_array_equal(got[-1]["latent"], got[0]["latent"])

  # The shards feed the pipeline.
  c = configlib.base_config()
  c.model.vocab_size = 1024
  c.data.update(dict(source="grain", image_caption=str(out), seq_len=64, max_images=2,
                     batch_size=2, prefetch=0, num_epochs=1))
  tok = samples.sample_tokenizer(str(tmp_path / "tok"), vocab_size=1000)
  c.data.tokenizer = tok.source
  batches = list(pipeline.make_iterator(c))
  for b in batches:
    batch_lib.check_batch_values(b, num_patches=16)
  assert sum(int(b["image_mask"].sum()) for b in batches) == 6


def test_rerun_skips_finished_shards_and_redoes_the_rest(setup, tmp_path, capsys):
  out = tmp_path / "out"
  _run(setup, out)
  first = capsys.readouterr().out.splitlines()[-1]
  shards = _shards(out)
  before = {f: os.stat(out / f).st_mtime_ns for f in shards}
  data = {f: (out / f).read_bytes() for f in shards}
  os.remove(out / shards[1])  # as if the run died while writing shard 1
  (out / (shards[1] + ".tmp")).write_bytes(b"partial")
  _run(setup, out)
  again = capsys.readouterr().out.splitlines()[-1]
  assert "(2 shards were already done)" in again
  assert again.replace("(2 shards", "(0 shards") == first
  for f in (shards[0], shards[2]):
    assert os.stat(out / f).st_mtime_ns == before[f]  # untouched
  assert (out / shards[1]).read_bytes() == data[shards[1]]  # same records again
  assert not (out / (shards[1] + ".tmp")).exists()
  with pytest.raises(SystemExit):
    _run(setup, out, "--shard_size", "4")
  assert "another precompute run" in capsys.readouterr().err


def test_tfds_source_is_read_without_downloading(setup, tmp_path, monkeypatch, capsys):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  fake = [{"image": rng.integers(0, 255, (20, 24, 3), dtype=np.uint8),
           "caption": f"example {i}".encode()} for i in range(4)]
  fake[2]["image"] = np.zeros((5,), np.uint8)  # not an image
  calls = []

  def data_source(name, **kw):
    calls.append((name, kw))
    return fake

  monkeypatch.setattr(tfds, "data_source", data_source)
  out = tmp_path / "tfds_out"
  precompute.main(["--vae", setup["vae"], "--out", str(out), "--tfds", "tiny_set",
                   "--data_dir", str(tmp_path), "--resolution", str(RES), "--batch_size", "3"])
  assert calls[0][1]["download"] is False
  assert "wrote 3 image–caption records" in capsys.readouterr().out
  got = records.read_records(str(out / _shards(out)[0]))
  assert [r["caption"] for r in got] == ["example 0", "example 1", "example 3"]
  assert got[0]["id"] == "tiny_set[0]"


def test_bad_inputs_are_clear_errors(setup, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"file": "a.png", "caption": "x"}\nnot json\n')
  with pytest.raises(SystemExit):
    precompute.main(["--vae", setup["vae"], "--out", str(tmp_path / "o"), "--images",
                     setup["folder"], "--captions", str(bad)])
  assert "bad.jsonl: line 2 is not JSON" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    precompute.main(["--vae", setup["vae"], "--out", str(tmp_path / "o"), "--tfds", "nothing",
                     "--data_dir", str(tmp_path)])
  assert "not prepared" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    precompute.main(["--vae", str(tmp_path / "novae"), "--out", str(tmp_path / "o"),
                     "--images", setup["folder"], "--captions", setup["captions"]])
  assert "novae" in capsys.readouterr().err


def test_in_memory_arrays_to_records_for_the_demo(setup, tmp_path):
  vae = vae_lib.load_vae(setup["vae"])
  rng = np.random.default_rng(0)
  images = [skimage.data.astronaut(),  # uint8 RGB, 512x512
            skimage.data.camera(),  # uint8 grayscale
            rng.random((12, 20, 3)),  # float in [0, 1], non-square, smaller than RES
            np.full((16, 16, 3), 2.0),  # float out of [0, 1]: unusable
            rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)]
  captions = ["an astronaut", "a camera man", "noise", "too bright", "   "]
  out = tmp_path / "arrays"
  summary = precompute.write_latent_records(images, captions, vae, str(out), resolution=RES,
                                            batch_size=2, shard_size=2)
  assert summary == {"written": 3, "skipped": {"unreadable image": 1, "empty caption": 1},
                     "shards": 3, "shards_done_before": 0}
  source = records.RecordSource([str(out / f) for f in _shards(out)])  # the last shard is empty
  assert source.counts == [2, 1, 0]
  got = [records.decode_record(source[i].data) for i in range(len(source))]
  assert [r["caption"] for r in got] == captions[:3]
  assert [r["id"] for r in got] == ["array[0]", "array[1]", "array[2]"]
  want = np.asarray(vae.encode(np.stack([images_lib.array_to_model_input(a, RES)
                                         for a in images[:3]])))
  for r, w in zip(got, want):
    assert r["latent"].dtype == np.float16 and r["latent"].shape == (8, 8, 4)
    np.testing.assert_allclose(r["latent"].astype(np.float32), w, atol=2e-3 * np.abs(w).max())
  # Same arrays again: nothing to redo. Other arrays into the same directory: an error.
  again = precompute.write_latent_records(images, captions, vae, str(out), resolution=RES,
                                          batch_size=2, shard_size=2)
  assert again["shards_done_before"] == 3 and again["written"] == 3
  with pytest.raises(ValueError, match="another precompute run"):
    precompute.write_latent_records(images[:4], captions[:3] + ["other"], vae, str(out),
                                    resolution=RES, batch_size=2, shard_size=2)
  with pytest.raises(ValueError, match="5 images but 4 captions"):
    precompute.write_latent_records(images, captions[:4], vae, str(tmp_path / "x"),
                                    resolution=RES)
