"""The other inputs of a fit: webdataset tar shards (--images) and precomputed embeddings
(--features: .npy, .safetensors, a clip-retrieval folder), on shards and arrays written here;
each gives what the image-folder path gives on the same images."""
import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import inmap_ext  # noqa: E402
from inmap_ext import clip as clip_mod  # noqa: E402
from inmap_ext import pipeline  # noqa: E402
from inmap_ext.cli import main  # noqa: E402
from inmap_ext.data import list_images  # noqa: E402
from inmap_ext.embeddings import load_features  # noqa: E402
from inmap_ext.errors import MissingExtraError  # noqa: E402
from inmap_ext.result import load_vision_proxy  # noqa: E402
from inmap_ext.synthetic import make_image_folder  # noqa: E402

MODEL = "ViT-B-32"
CLASSES = ["red", "green", "blue"]
HERE = os.path.dirname(__file__)
needs_wds = pytest.mark.skipif(importlib.util.find_spec("webdataset") is None,
                               reason="webdataset not installed (pip install 'inmap_ext[wds]')")
needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="pyarrow not installed (pip install "
                                   "'inmap_ext[parquet]')")


def _member(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def write_shards(folder, paths, per_shard, extra=None):
    """Tars of ``paths`` in order (key: the file's name without extension; a .json member
    beside each image); ``extra``: shard index -> [(member name, bytes)] appended to it."""
    os.makedirs(folder, exist_ok=True)
    shards = []
    for s in range(0, len(paths), per_shard):
        path = os.path.join(folder, f"{s // per_shard:05d}.tar")
        with tarfile.open(path, "w") as t:
            for p in paths[s:s + per_shard]:
                key = os.path.splitext(os.path.basename(p))[0]
                _member(t, key + ".png", open(p, "rb").read())
                _member(t, key + ".json", json.dumps({"file": p}).encode())
            for name, data in (extra or {}).get(s // per_shard, []):
                _member(t, name, data)
        shards.append(path)
    return shards


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A random-weight checkpoint, 12 flat images, the same images in 3 tar shards (shard 1 also
    holds an undecodable image and a sample without an image), a classes file."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    ckpt = root / "tiny_random.pt"
    torch.save(open_clip.create_model(MODEL, pretrained=None).state_dict(), ckpt)
    flat = root / "flat"
    make_image_folder(str(flat), CLASSES, per_class=4, size=40, labeled=False)
    paths = list_images(str(flat)).paths
    bad = {1: [("broken.jpg", b"not a jpeg"), ("caption_only.txt", b"no image here")]}
    shards = write_shards(str(root / "shards"), paths, 4, bad)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return dict(root=root, ckpt=str(ckpt), flat=str(flat), paths=paths, shards=shards,
                classes=str(root / "classes.txt"), cache=str(root / "cache"))


def _fit(ws, out, *source, extra=()):
    return main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], *source, "--classes",
                 ws["classes"], "--out", str(out), "--workers", "0", "--cache-dir",
                 ws["cache"], "--iters", "40", "--labels", "none", "--log", "json", *extra])


def _rows(path):
    return list(csv.DictReader(open(path)))


# -- tar shards ----------------------------------------------------------------------------------
@needs_wds
def test_shards_give_what_the_image_folder_gives(ws, tmp_path, capsys):
    assert _fit(ws, tmp_path / "folder", "--images", ws["flat"]) == 0
    pattern = os.path.join(os.path.dirname(ws["shards"][0]), "{00000..00002}.tar")
    assert _fit(ws, tmp_path / "tars", "--images", pattern) == 0
    a = load_vision_proxy(tmp_path / "folder" / "proxy.safetensors")
    b = load_vision_proxy(tmp_path / "tars" / "proxy.safetensors")
    torch.testing.assert_close(b.proxy, a.proxy)
    by_folder, by_tars = _rows(tmp_path / "folder" / "predictions.csv"), \
        _rows(tmp_path / "tars" / "predictions.csv")
    # each sample's key is its id; nothing but the two bad samples is lost
    assert [r["id"] for r in by_tars] == [os.path.splitext(os.path.basename(p))[0]
                                          for p in ws["paths"]]
    assert [r["inmap_class_1"] for r in by_tars] == [r["inmap_class_1"] for r in by_folder]
    for r, s in zip(by_folder, by_tars):
        assert float(s["inmap_cosine_1"]) == pytest.approx(float(r["inmap_cosine_1"]), abs=1e-5)
    report = json.loads((tmp_path / "tars" / "report.json").read_text())
    assert report["n_images"] == 14 and report["n_used"] == 12
    assert sorted(report["skipped"]) == ["broken", "caption_only"]     # listed like corrupt files
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if line.startswith("{")]
    feats = [e for e in events if e["event"] == "features"]
    assert feats[-1]["encoded"] == 14 and feats[-1]["images_per_s"] > 0
    assert report["features"]["images_per_s"] > 0

    # the same shards as a folder of .tar files and as a list file: the same samples
    folder = pipeline.list_source(os.path.dirname(ws["shards"][0]))
    listing = tmp_path / "shards.txt"
    listing.write_text("# shards\n" + "\n".join(ws["shards"]) + "\n")
    assert folder.shards == ws["shards"] == pipeline.list_source(str(listing)).shards
    assert main(["predict", "--proxy", str(tmp_path / "tars" / "proxy.safetensors"), "--images",
                 str(listing), "--out", str(tmp_path / "p.csv"), "--workers", "0",
                 "--cache-dir", ws["cache"], "-q"]) == 0
    assert [r["inmap_class_1"] for r in _rows(tmp_path / "p.csv")] == \
        [r["inmap_class_1"] for r in by_tars]
    rep = json.loads((tmp_path / "p.report.json").read_text())
    assert rep["features"]["encoded"] == 0            # every shard came from the cache
    from inmap_ext.cache import list_entries

    wds = [e for e in list_entries(ws["cache"]) if e.key.startswith("wds-")]
    assert [(e.n_images, e.complete) for e in wds] == [(14, True)]    # `inmap cache` lists it


@needs_wds
def test_image_member_names_are_configurable(ws, tmp_path):
    shard = tmp_path / "one.tar"
    with tarfile.open(shard, "w") as t:
        _member(t, "a.seg.png", open(ws["paths"][0], "rb").read())   # key a, member seg.png
        _member(t, "a.webp", open(ws["paths"][1], "rb").read())
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    kw = dict(cache_dir=str(tmp_path / "c"), workers=0, progress=False)
    from inmap_ext.shards import shard_features

    first = shard_features(clip, pipeline.list_source(str(shard)), **kw)[0]
    seg = shard_features(clip, pipeline.list_source(str(shard), image_keys=("seg.png",)), **kw)[0]
    direct = clip_mod.image_features(clip, list_images(str(ws["flat"])), **kw)[0]
    torch.testing.assert_close(first[0], direct[1])         # the first listed key found: webp
    torch.testing.assert_close(seg[0], direct[0])
    with pytest.raises(ValueError, match="--wds-image-keys must be"):
        from inmap_ext.cli import _image_keys
        _image_keys("jpg,,png")


@needs_wds
def test_an_interrupted_extraction_resumes_shard_by_shard(ws, tmp_path):
    from inmap_ext.shards import shard_features

    good = write_shards(str(tmp_path / "good"), ws["paths"], 4)       # 3 shards of 4
    shards = pipeline.list_source(str(tmp_path / "good"))
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    real = clip.model.encode_image
    calls = []

    def killed_in_the_third_shard(x, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(len(x))
        return real(x, **kw)

    clip.model.encode_image = killed_in_the_third_shard
    kw = dict(cache_dir=str(tmp_path / "cache"), batch_size=4, workers=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        shard_features(clip, shards, **kw)
    cache_dir = os.path.join(kw["cache_dir"], os.listdir(kw["cache_dir"])[0])
    names = os.listdir(cache_dir)
    assert sum(n.endswith(".safetensors") for n in names) == 2        # shards 0 and 1 written
    assert not [n for n in names if ".tmp" in n]                       # nothing half written
    calls.clear()
    clip.model.encode_image = lambda x, **k: calls.append(len(x)) or real(x, **k)
    feats, ok, cache = shard_features(clip, shards, **kw)
    assert calls == [4] and cache.encoded == 4                          # only the third shard
    fresh = clip_mod.image_features(clip, list_images(ws["flat"]), **kw)[0]
    torch.testing.assert_close(feats, fresh)
    # a changed shard (new size / modification time) is encoded again, the others are not
    os.utime(good[0], ns=(time.time_ns(), time.time_ns()))
    calls.clear()
    shard_features(clip, shards, **kw)
    assert calls == [4]


def _start(tmp_path, name, cache, go, sleep_s, shards):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "wds_workers.py"), cache, str(out),
                          str(go), str(sleep_s), *shards], env=env)
    return p, out


@needs_wds
def test_two_extractions_into_one_cache_encode_each_shard_once(ws, tmp_path):
    """Two processes at once on the same shards: every shard is encoded by one of them, each
    entry is whole, both read the same features."""
    shards = write_shards(str(tmp_path / "s"), ws["paths"] * 2, 4)          # 6 shards of 4
    cache, go = str(tmp_path / "cache"), tmp_path / "go"
    (a, out_a), (b, out_b) = (_start(tmp_path, n, cache, go, 0.3, shards) for n in "ab")
    go.touch()
    assert a.wait(120) == 0 and b.wait(120) == 0
    ra, rb = json.loads(out_a.read_text()), json.loads(out_b.read_text())
    assert ra["encoded"] + rb["encoded"] == 24                  # no shard encoded twice
    assert ra["ok"] == rb["ok"] == ra["n"] == 24
    entry = os.path.join(cache, os.listdir(cache)[0])
    assert sum(n.endswith(".safetensors") for n in os.listdir(entry)) == 6
    assert not [n for n in os.listdir(entry) if ".tmp" in n or n.endswith(".lock")]


@needs_wds
def test_shards_named_in_any_case_rewritten_in_place_or_under_any_name(ws, tmp_path, capsys):
    """A folder's .TAR / .Tar shards are read like .tar ones; a shard rewritten with other
    images of the same size and its modification time set back (cp -p, rsync -a) is encoded
    again, never served stale; a shard under a folder whose name is not UTF-8 is cached and
    fitted (the cache's metadata keeps the name's bytes as escapes)."""
    folder = tmp_path / "mixed"
    shards = write_shards(str(folder), ws["paths"][:6], 2)
    os.rename(shards[0], str(folder / "00000.TAR"))
    os.rename(shards[1], str(folder / "00001.Tar"))
    assert [os.path.basename(p) for p in pipeline.list_source(str(folder)).shards] == \
        ["00000.TAR", "00001.Tar", "00002.tar"]

    cache = str(tmp_path / "cache")
    one = write_shards(str(tmp_path / "one"), ws["paths"][:2], 2)[0]
    st = os.stat(one)

    def fit(out):
        capsys.readouterr()
        assert main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", one,
                     "--classes", ws["classes"], "--out", str(out), "--workers", "0",
                     "--cache-dir", cache, "--iters", "5", "--labels", "none",
                     "--log", "json"]) == 0
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines()
                  if line.startswith("{")]
        return [e for e in events if e["event"] == "features"][-1]["encoded"], \
            [r["zero_shot_cosine_1"] for r in _rows(out / "predictions.csv")]

    encoded, first = fit(tmp_path / "o1")
    assert encoded == 2 and fit(tmp_path / "o2") == (0, first)          # cached
    time.sleep(0.01)
    with tarfile.open(one) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(one, "w") as t:                      # other images under the same keys
        others = iter(ws["paths"][6:8])
        for name, data in members:
            _member(t, name, open(next(others), "rb").read() if name.endswith(".png") else data)
    assert os.stat(one).st_size <= st.st_size
    os.truncate(one, st.st_size)                   # zero blocks after the archive's end: the same
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns))   # size, then the same time
    assert os.stat(one).st_size == st.st_size and os.stat(one).st_mtime_ns == st.st_mtime_ns
    encoded, again = fit(tmp_path / "o3")
    assert encoded == 2 and again != first

    odd = os.fsdecode(bytes(tmp_path) + b"/w\xe9")          # not UTF-8
    os.makedirs(odd)
    one = write_shards(odd, ws["paths"][:2], 2)[0]
    encoded, _ = fit(tmp_path / "o4")
    assert encoded == 2 and fit(tmp_path / "o5")[0] == 0


@needs_wds
def test_a_killed_extraction_never_blocks_the_next(ws, tmp_path):
    """The first process dies holding shard locks; the second, waiting on them, encodes what
    the first had not written, and reuses what it had."""
    shards = write_shards(str(tmp_path / "s"), ws["paths"] * 2, 4)
    cache, go = str(tmp_path / "cache"), tmp_path / "go"
    go.touch()
    a, _ = _start(tmp_path, "a", cache, go, 1.0, shards)
    entry = None
    deadline = time.time() + 120
    while time.time() < deadline:       # until the first process has written one shard
        if os.path.isdir(cache) and os.listdir(cache):
            entry = os.path.join(cache, os.listdir(cache)[0])
            if any(n.endswith(".safetensors") for n in os.listdir(entry)):
                break
        time.sleep(0.05)
    b, out_b = _start(tmp_path, "b", cache, go, 0.0, shards)
    time.sleep(1.0)
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert b.wait(120) == 0
    rb = json.loads(out_b.read_text())
    assert rb["ok"] == 24 and 0 < rb["encoded"] <= 20           # the first's shards reused
    assert sum(n.endswith(".safetensors") for n in os.listdir(entry)) == 6


def test_cli_image_keys_mirror_the_library():
    from inmap_ext import cli, shards

    assert cli.DEFAULT_IMAGE_KEYS == shards.DEFAULT_IMAGE_KEYS


def test_shards_without_webdataset_name_the_extra(ws, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "webdataset", None)
    pattern = str(tmp_path / "{00000..00002}.tar")
    with pytest.raises(MissingExtraError, match=r"inmap_ext\[wds\]"):
        pipeline.list_source(pattern)
    assert main(["extract", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", pattern,
                 "-q"]) == 3
    assert "inmap_ext[wds]" in capsys.readouterr().err


# -- precomputed features -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_features(ws):
    """The flat folder's features from the image pipeline (the reference)."""
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    f, ok, _ = clip_mod.image_features(clip, list_images(ws["flat"]), cache_dir=ws["cache"],
                                       workers=0, progress=False)
    assert ok.all()
    return f


def test_npy_features_fit_like_the_images(ws, folder_features, tmp_path, capsys):
    # --solver gd: a rounding-stable path, so the proxies compare closely (L-BFGS carries
    # float32 rounding of the renormalised rows along flat directions: test_streaming.py)
    assert _fit(ws, tmp_path / "folder", "--images", ws["flat"], "--solver", "gd") == 0
    npy = tmp_path / "x.npy"
    np.save(npy, (folder_features * 3).numpy())           # not unit-norm: normalised, said so
    capsys.readouterr()
    assert _fit(ws, tmp_path / "npy", "--features", str(npy), "--solver", "gd") == 0
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if line.startswith("{")]
    assert any(e["event"] == "normalised" and e["not_unit"] == 12 for e in events)
    torch.testing.assert_close(load_vision_proxy(tmp_path / "npy" / "proxy.safetensors").proxy,
                               load_vision_proxy(tmp_path / "folder" / "proxy.safetensors").proxy)
    rows = _rows(tmp_path / "npy" / "predictions.csv")
    assert [r["id"] for r in rows] == [str(i) for i in range(12)]      # row numbers
    assert [r["inmap_class_1"] for r in rows] == \
        [r["inmap_class_1"] for r in _rows(tmp_path / "folder" / "predictions.csv")]
    report = json.loads((tmp_path / "npy" / "report.json").read_text())
    assert report["features"]["normalised_rows"] == 12 and report["n_used"] == 12
    # predict reads features too: no encoder, the same classes
    assert main(["predict", "--proxy", str(tmp_path / "npy" / "proxy.safetensors"),
                 "--features", str(npy), "--out", str(tmp_path / "p.csv"), "-q"]) == 0
    assert [r["inmap_class_1"] for r in _rows(tmp_path / "p.csv")] == \
        [r["inmap_class_1"] for r in rows]
    # --pretrained says which weights made them: the proxy's are fine, others an input error
    predict = ["predict", "--proxy", str(tmp_path / "npy" / "proxy.safetensors"), "--features",
               str(npy), "--out", str(tmp_path / "p.csv"), "-q"]
    assert main(predict + ["--pretrained", ws["ckpt"]]) == 0
    capsys.readouterr()
    assert main(predict + ["--pretrained", "laion2b_s34b_b79k"]) == 3
    assert "was fitted with --pretrained" in capsys.readouterr().err
    assert main(predict + ["--pretrained", "laion2b_s34b_b79k", "--force"]) == 0


def test_features_of_the_wrong_dimension_or_not_finite_are_input_errors(ws, tmp_path, capsys,
                                                                          monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(clip_mod, "load_model", no_model)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((5, 256), dtype=np.float32))
    assert _fit(ws, tmp_path / "o", "--features", str(wrong), extra=["-q"]) == 3
    err = capsys.readouterr().err
    assert "dimension 256" in err and "dimension 512" in err
    bad = np.random.default_rng(0).standard_normal((40, 512)).astype(np.float32)
    bad[7, 3], bad[30] = np.nan, 0
    np.save(tmp_path / "bad.npy", bad)               # content, too, before the model loads
    assert _fit(ws, tmp_path / "o", "--features", str(tmp_path / "bad.npy"),
                extra=["-q"]) == 3
    assert "rows 7, 30" in capsys.readouterr().err
    for dtype in (">f4", np.longdouble):              # byte order, width: named, not torch's
        np.save(tmp_path / "odd.npy", np.ones((4, 512), dtype=dtype))
        assert _fit(ws, tmp_path / "o", "--features", str(tmp_path / "odd.npy"),
                    extra=["-q"]) == 3
        assert "expected float16, float32 or float64 rows in this machine's byte order" in \
            capsys.readouterr().err
    from inmap_ext.fileio import save_safetensors

    for ids in ('"abcd"', '{"a": 1}'):                # 'ids' must be a JSON list
        save_safetensors({"x": torch.ones(4, 512)}, str(tmp_path / "ids.safetensors"),
                         metadata={"ids": ids})
        assert _fit(ws, tmp_path / "o", "--features", str(tmp_path / "ids.safetensors"),
                    extra=["-q"]) == 3
        assert "metadata 'ids' is not a JSON list" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:                     # one source, not both
        _fit(ws, tmp_path / "o", "--features", str(wrong), "--images", ws["flat"])
    assert e.value.code == 2


@needs_pyarrow
def test_a_clip_retrieval_folder(ws, folder_features, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "retrieval"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    x = folder_features.numpy().astype(np.float16)          # what clip-retrieval writes
    for i, (s, e) in enumerate([(0, 5), (5, 12)]):          # two parts, read in order
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[s:e])
        pq.write_table(pa.table({"image_path": ws["paths"][s:e], "caption": ["c"] * (e - s)}),
                       root / "metadata" / f"metadata_{i}.parquet")
    emb = load_features(str(root), cache_dir=str(tmp_path / "c"))
    assert emb.ids == ws["paths"] and emb.kind == "clip-retrieval"
    torch.testing.assert_close(emb.features.float(), torch.from_numpy(x).float())
    assert _fit(ws, tmp_path / "cr", "--features", str(root), extra=["-q"]) == 0
    assert _fit(ws, tmp_path / "folder", "--images", ws["flat"], extra=["-q"]) == 0
    rows, ref = _rows(tmp_path / "cr" / "predictions.csv"), \
        _rows(tmp_path / "folder" / "predictions.csv")
    assert [r["id"] for r in rows] == [r["path"] for r in ref]
    agree = np.mean([a["inmap_class_1"] == b["inmap_class_1"] for a, b in zip(rows, ref)])
    assert agree == 1.0                                     # float16 storage: same classes


def test_joined_embeddings_are_a_cache_entry_never_stale(tmp_path):
    """Several img_emb files are joined once into the cache: `inmap cache` lists the copy,
    --clear removes it, and a part rewritten with its size and time kept is joined again."""
    from inmap_ext.cache import clear_cache, list_entries

    root, cache = tmp_path / "emb", str(tmp_path / "c")
    (root / "img_emb").mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 7)]
    for i, a in enumerate(parts):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", a)
    emb = load_features(str(root), cache_dir=cache)
    np.testing.assert_array_equal(emb.features.numpy(), np.concatenate(parts))
    (entry,) = list_entries(cache)
    assert entry.key.startswith("emb-") and entry.n_images == 12 and entry.complete
    assert entry.root == str(root)
    del emb
    part = root / "img_emb" / "img_emb_1.npy"
    st = os.stat(part)
    time.sleep(0.01)
    parts[1] = -parts[1]
    np.save(part, parts[1])                                   # the same size
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))       # and time: cp -p, rsync -a
    emb = load_features(str(root), cache_dir=cache)
    np.testing.assert_array_equal(emb.features.numpy(), np.concatenate(parts))
    assert len(list_entries(cache)) == 2
    del emb
    assert len(clear_cache(cache)) == 2 and list_entries(cache) == []
    assert not [n for n in os.listdir(cache) if n.startswith("emb-")]


def test_loaded_features_stream_into_the_fit_without_a_copy(tmp_path):
    from safetensors.torch import save_file
    from testing import clip_like

    x, t, _ = clip_like(n=300, d=32, c=6, dtype=torch.float32)
    np.save(tmp_path / "x.npy", (x * 2).numpy())
    emb = inmap_ext.load_features(str(tmp_path / "x.npy"))
    assert isinstance(np.load(tmp_path / "x.npy", mmap_mode="r"), np.memmap)
    assert not emb.features.untyped_storage().resizable()            # a view of the mapping
    streamed = inmap_ext.fit_vision_proxy(emb.features, t, stream=True, iters=30, chunk_size=64,
                                          solver="gd")
    in_memory = inmap_ext.fit_vision_proxy(x, t, iters=30, solver="gd")
    torch.testing.assert_close(streamed.proxy, in_memory.proxy, atol=1e-5, rtol=1e-4)
    save_file({"image_features": x, "other": torch.zeros(3)}, str(tmp_path / "x.safetensors"),
              metadata={"ids": json.dumps([f"img{i}" for i in range(300)])})
    st = inmap_ext.load_features(str(tmp_path / "x.safetensors"))
    assert st.ids[:2] == ["img0", "img1"] and torch.equal(st.features, x)
