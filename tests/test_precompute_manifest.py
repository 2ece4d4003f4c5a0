"""tfusion-precompute-latents reruns: other VAE, resolution, captions or images into the same
--out are refused in one line naming what changed (old shards untouched) unless --overwrite,
which deletes them first; skipped items are named."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tfusion import vae as vae_lib
from tfusion.data import precompute, records

RES = 16
TINY_VAE = vae_lib.VAEConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("manifest")
  for seed in (0, 1):
    vae_lib.save_vae(vae_lib.init_vae(TINY_VAE, seed=seed), str(d / f"vae{seed}"))
  folder = d / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
  (folder / "broken.png").write_bytes(b"not an image")
  lines = [{"file": f"{i}.png", "caption": f"picture {i}"} for i in range(4)]
  lines.insert(1, {"file": "broken.png", "caption": "unreadable"})
  lines.append({"file": "gone.png", "caption": "missing"})
  (d / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return d


def _run(d, out, *extra, vae="vae0", captions="captions.jsonl", images="images"):
  precompute.main(["--vae", str(d / vae), "--out", str(out), "--images", str(d / images),
                   "--captions", str(d / captions), "--resolution", str(RES), "--batch_size",
                   "2", "--shard_size", "2", *extra])


def _snapshot(out):
  return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}


def _refused(capsys, d, out, **kw):
  """Runs with changed inputs; returns the one error line (and checks nothing moved)."""
  before = _snapshot(out)
  with pytest.raises(SystemExit) as e:
    _run(d, out, **kw)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--overwrite" in err[0], err
  assert _snapshot(out) == before  # nothing written before is lost
  return err[0]


def test_changed_inputs_are_refused_naming_what_changed(inputs, tmp_path, capsys):
  d, out = inputs, tmp_path / "out"
  _run(d, out)
  capsys.readouterr()
  _run(d, out)  # the same inputs: resumes, nothing redone
  assert "(3 shards were already done)" in capsys.readouterr().out

  line = _refused(capsys, d, out, vae="vae1")
  assert "the VAE" in line and "captions" not in line and "resolution" not in line

  # The same images copied elsewhere (new mtimes) are the same inputs.
  import shutil
  shutil.copytree(d / "images", tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
  os.utime(tmp_path / "copy" / "0.png", (1, 1))
  _run(d, out, images=tmp_path / "copy")
  assert "(3 shards were already done)" in capsys.readouterr().out

  # One caption edited (same number of lines): the captions changed, not the images.
  text = (d / "captions.jsonl").read_text()
  (tmp_path / "edited.jsonl").write_text(text.replace("picture 2", "a photo"))
  line = _refused(capsys, d, out, captions=tmp_path / "edited.jsonl")
  assert "captions" in line and "images" not in line and "VAE" not in line

  # One image replaced by a different one: the images changed, not the captions.
  shutil.copytree(d / "images", tmp_path / "changed")
  rng = np.random.default_rng(5)
  Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
      tmp_path / "changed" / "3.png")
  line = _refused(capsys, d, out, images=tmp_path / "changed")
  assert "images" in line and "captions" not in line

  before = _snapshot(out)
  with pytest.raises(SystemExit):
    precompute.main(["--vae", str(d / "vae0"), "--out", str(out), "--images", str(d / "images"),
                     "--captions", str(d / "captions.jsonl"), "--resolution", str(2 * RES),
                     "--batch_size", "2", "--shard_size", "2"])
  assert "resolution (16 -> 32)" in capsys.readouterr().err
  assert _snapshot(out) == before


def test_overwrite_deletes_old_shards_first(inputs, tmp_path, capsys):
  d, out = inputs, tmp_path / "out"
  _run(d, out)
  old = [f for f in os.listdir(out) if f.endswith(records.EXTENSION)]
  assert len(old) == 3  # 6 captions in shards of 2
  text = (d / "captions.jsonl").read_text()
  (tmp_path / "edited.jsonl").write_text(text.replace("picture 2", "a photo"))
  # Another shard size too: old shard names (-of-00003) differ from the new ones (-of-00002).
  _run(d, out, "--overwrite", "--shard_size", "3", captions=tmp_path / "edited.jsonl")
  assert "(0 shards were already done)" in capsys.readouterr().out
  shards = sorted(f for f in os.listdir(out) if f.endswith(records.EXTENSION))
  assert shards == [f"image_caption-{s:05d}-of-00002{records.EXTENSION}" for s in range(2)]
  assert not [f for f in os.listdir(out) if "-of-00003" in f]
  got = [r["caption"] for f in shards for r in records.read_records(str(out / f))]
  assert got == ["picture 0", "picture 1", "a photo", "picture 3"]


def test_skip_summary_names_the_skipped_items(inputs, tmp_path, capsys):
  _run(inputs, tmp_path / "out")
  lines = capsys.readouterr().out.splitlines()
  assert "skipped (missing image file, 1x): gone.png (line 6)" in lines
  assert "skipped (unreadable image, 1x): broken.png (line 2)" in lines
  # A resumed run names them too (from the finished shards' counts).
  _run(inputs, tmp_path / "out")
  assert "skipped (unreadable image, 1x): broken.png (line 2)" in capsys.readouterr().out


def test_vae_fingerprint_sees_weights_and_statistics(inputs):
  a = vae_lib.load_vae(str(inputs / "vae0"))
  assert precompute.vae_fingerprint(a) == precompute.vae_fingerprint(
      vae_lib.load_vae(str(inputs / "vae0")))
  assert precompute.vae_fingerprint(a) != precompute.vae_fingerprint(
      vae_lib.load_vae(str(inputs / "vae1")))
  stats = a.with_stats(np.zeros(4), np.full(4, 2.0))
  assert precompute.vae_fingerprint(stats) != precompute.vae_fingerprint(a)
