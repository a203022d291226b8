"""The CLIP pipeline and the `inmap` command, offline: a real open_clip architecture with random
weights saved to a local checkpoint file, generated image folders (labeled and flat, a corrupt
file, nested folders, odd extensions)."""
import csv
import json
import os

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from inmap_ext import clip as clip_mod  # noqa: E402
from inmap_ext import pipeline  # noqa: E402
from inmap_ext.cache import FeatureCache  # noqa: E402
from inmap_ext.classifier import VisionProxyClassifier  # noqa: E402
from inmap_ext.cli import main  # noqa: E402
from inmap_ext.data import list_images  # noqa: E402
from inmap_ext.result import load_vision_proxy  # noqa: E402
from inmap_ext.synthetic import make_image_folder  # noqa: E402

MODEL = "ViT-B-32"
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: checkpoint, classes file, labeled folder (with a corrupt file, an upper-case
    extension and a non-image), flat folder with nesting."""
    root = tmp_path_factory.mktemp("ws")
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    ckpt = root / "tiny_random.pt"
    torch.save(model.state_dict(), ckpt)
    labeled = root / "labeled"
    make_image_folder(str(labeled), CLASSES, per_class=4, size=40)
    os.rename(labeled / "red" / "000.png", labeled / "red" / "000.PNG")
    (labeled / "green" / "broken.jpg").write_bytes(b"not an image at all")
    (labeled / "blue" / "notes.txt").write_text("ignored")
    flat = root / "flat"
    make_image_folder(str(flat), ["purple", "orange"], per_class=3, size=40, labeled=False)
    make_image_folder(str(flat / "deeper" / "still"), ["yellow"], per_class=2, size=40,
                      labeled=False)
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return dict(root=root, ckpt=str(ckpt), labeled=str(labeled), flat=str(flat),
                classes=str(classes), cache=str(root / "cache"))


def test_list_images_layouts(ws):
    s = list_images(ws["labeled"], CLASSES)
    assert len(s) == 13 and s.labels is not None            # 12 + broken.jpg; notes.txt ignored
    assert any(p.endswith("000.PNG") for p in s.paths)
    assert {CLASSES[l] for l in s.labels} == set(CLASSES)
    assert all(os.path.basename(os.path.dirname(p)) == CLASSES[l]
               for p, l in zip(s.paths, s.labels))
    flat = list_images(ws["flat"], CLASSES)
    assert flat.labels is None and len(flat) == 8           # recursive
    with pytest.raises(ValueError, match=r"1 image folder\(s\) match no class name: 'blue'"):
        list_images(ws["labeled"], ["red", "green", "cyan"], labels="folder")
    lst = ws["root"] / "list.txt"
    lst.write_text("\n".join(flat.paths[:3]) + "\n")
    assert list_images(str(lst)).paths == flat.paths[:3]
    # a list of one class folder's images, labeled by that folder; one image is a set of one
    reds = [p for p, l in zip(s.paths, s.labels) if l == 0]
    (ws["root"] / "reds.txt").write_text("\n".join(reds) + "\n")
    one_class = list_images(str(ws["root"] / "reds.txt"), CLASSES, labels="folder")
    assert one_class.paths == reds and one_class.labels == [0] * len(reds)
    for one in (list_images(reds[1], CLASSES), pipeline.list_source(reds[1], CLASSES)):
        assert one.paths == [reds[1]] and one.labels is None


def test_templates_and_classes(ws, tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\nart of the {}.\n")
    t = clip_mod.load_templates(str(tmp_path / "t.txt"))
    assert [x("cat") for x in t] == ["a photo of a cat.", "art of the cat."]   # one kind
    assert clip_mod.template_strings(t) == ["a photo of a {}.", "art of the {}."]
    clip = clip_mod.load_model(MODEL, ws["ckpt"])             # a file mixing the two forms
    (tmp_path / "t2.txt").write_text("art of the {}.\na photo of a {c}.\n")
    torch.testing.assert_close(
        clip_mod.text_proxies(clip, CLASSES, clip_mod.load_templates(str(tmp_path / "t2.txt"))),
        clip_mod.text_proxies(clip, CLASSES, ["art of the {}.", "a photo of a {}."]))
    assert len(clip_mod.load_templates("openai")) == 80
    assert len(clip_mod.load_templates("simple")) == 7
    assert len(clip_mod.load_classnames("imagenet").names) == 1000
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="has no class placeholder"):
        clip_mod.load_templates(str(tmp_path / "bad.txt"))
    (tmp_path / "names.txt").write_text("red\nRed\ngreen\n")      # one name to folders
    with pytest.raises(ValueError, match="'red' and 'Red' differ only in case"):
        clip_mod.load_classnames(str(tmp_path / "names.txt"))
    (tmp_path / "p.json").write_text(json.dumps({"cat": ["a cat"], "dog": "a dog"}))
    with pytest.raises(ValueError, match="a list of prompt strings per class; 'dog' has str"):
        clip_mod.load_prompts(str(tmp_path / "p.json"), ["cat", "dog"])
    with pytest.raises(ValueError, match="--pretrained is empty"):
        clip_mod.check_weights(MODEL, " ")
    (tmp_path / "map.json").write_text(json.dumps({"n001": "red", "n002": "green"}))
    spec = clip_mod.load_classnames(str(tmp_path / "map.json"))
    assert spec.names == ["red", "green"] and spec.folder_map["n002"] == "green"


def test_text_proxies_templates_and_prompts(ws):
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    t = clip_mod.text_proxies(clip, CLASSES, clip_mod.load_templates("simple"))
    ref = open_clip.build_zero_shot_classifier(clip.model, clip.tokenizer, CLASSES,
                                               open_clip.SIMPLE_IMAGENET_TEMPLATES)
    torch.testing.assert_close(t, ref)
    prompts = {c: [f"a {c} disc", f"something {c}"] for c in CLASSES}
    p = clip_mod.text_proxies(clip, CLASSES, prompts=prompts)
    assert p.shape == t.shape
    torch.testing.assert_close(p.norm(dim=0), torch.ones(3))
    # per-class prompts equal to the templates reproduce the template path
    same = {c: [tp(c) for tp in open_clip.SIMPLE_IMAGENET_TEMPLATES] for c in CLASSES}
    torch.testing.assert_close(clip_mod.text_proxies(clip, CLASSES, prompts=same), t,
                               rtol=1e-5, atol=1e-5)


def test_quickgelu_warning(ws, tmp_path):
    path = tmp_path / "openai_vit_b32.pt"
    path.write_bytes(open(ws["ckpt"], "rb").read())
    with pytest.warns(UserWarning, match="QuickGELU"):
        clip_mod.load_model(MODEL, str(path))


def test_cli_fit_predict_export_eval(ws, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
               "--classes", ws["classes"], "--out", str(out), "--workers", "0",
               "--cache-dir", ws["cache"], "--iters", "50", "--topk", "2", "--log", "json"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 13 and report["n_used"] == 12 and report["n_skipped"] == 1
    assert report["skipped"][0].endswith("broken.jpg")
    assert set(report["zero_shot"]) == {"acc1", "mean_per_class_recall"}   # 3 classes: no acc5
    assert report["num_classes"] == 3 and 0 < report["descent"]["n_iters"] <= 50
    assert report["hyper"]["iters"] == 50
    events = [json.loads(l)["event"] for l in capsys.readouterr().err.splitlines()
              if l.startswith("{")]
    assert {"images", "features", "fit", "accuracy", "done"} <= set(events)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    # the columns say which classifier each class comes from
    assert len(rows) == 12 and list(rows[0]) == [
        "path", "label", "inmap_class_1", "inmap_cosine_1", "inmap_class_2", "inmap_cosine_2",
        "zero_shot_class_1", "zero_shot_cosine_1"]
    res = load_vision_proxy(out / "proxy.safetensors")
    feats, ok, _ = clip_mod.image_features(clip_mod.load_model(MODEL, ws["ckpt"]),
                                           list_images(ws["labeled"], CLASSES),
                                           cache_dir=ws["cache"], workers=0, progress=False)
    feats = feats[ok]                                        # the readable images, in order
    assert [r["inmap_class_1"] for r in rows] == [CLASSES[i] for i in res.predict(feats)]
    assert [r["zero_shot_class_1"] for r in rows] == \
        [CLASSES[i] for i in res.zero_shot_predict(feats)]
    assert res.metadata["model"] == MODEL and json.loads(res.metadata["classnames"]) == CLASSES
    assert res.proxy.shape == (512, 3)

    pred_csv = tmp_path / "pred.csv"
    assert main(["predict", "--proxy", str(out / "proxy.safetensors"), "--images", ws["flat"],
                 "--out", str(pred_csv), "--workers", "0", "--cache-dir", ws["cache"],
                 "-q"]) == 0
    prow = list(csv.DictReader(open(pred_csv)))
    assert len(prow) == 8 and "inmap_class_3" in prow[0] and "zero_shot_class_1" in prow[0]
    prep = json.loads((tmp_path / "pred.report.json").read_text())
    assert prep["n_images"] == 8 and prep["n_used"] == 8 and prep["skipped"] == []

    clf = tmp_path / "clf.pt"
    assert main(["export", "--proxy", str(out / "proxy.safetensors"), "--out", str(clf)]) == 0
    w = torch.load(clf, weights_only=True)
    assert isinstance(w, torch.Tensor) and torch.equal(w, res.proxy)

    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(ev), "--workers", "0",
                 "--cache-dir", ws["cache"], "--iters", "30", "-q"]) == 0
    recs = json.loads(ev.read_text())
    assert [r["method"] for r in recs][:3] == ["text proxy (zero-shot)", "vision proxy (InMaP)",
                                           "vision proxy + Sinkhorn (InMaP)"]
    assert all(set(r["metrics"]) == {"acc1", "mean_per_class_recall"} for r in recs)
    assert recs[0]["metrics"]["acc1"] == pytest.approx(report["zero_shot"]["acc1"])
    # --sinkhorn-iters 0 is honoured: no published Sinkhorn record, an unbalanced default fit
    assert main(["eval", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(ev), "--workers", "0",
                 "--cache-dir", ws["cache"], "--iters", "30", "--sinkhorn-iters", "0", "-q"]) == 0
    recs = json.loads(ev.read_text())
    assert [r["method"] for r in recs] == ["text proxy (zero-shot)", "vision proxy (InMaP)",
                                           "vision proxy, class prior (inmap_ext default)"]
    assert recs[2]["class_prior"]["chosen"] == "none"
    # --solver picks the default fit's solver; the published runs keep the published descent
    assert main(["eval", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(ev), "--workers", "0",
                 "--cache-dir", ws["cache"], "--iters", "30", "--solver", "lbfgs", "-q"]) == 0
    recs = json.loads(ev.read_text())
    assert [r["mode"] for r in recs[1:]] == ["paper", "paper", "default"]


def test_cli_exit_codes(ws, tmp_path, capsys):
    assert main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images",
                 str(tmp_path / "missing"), "--classes", ws["classes"], "--out",
                 str(tmp_path / "o"), "-q"]) == 3
    assert "neither a folder nor a file list" in capsys.readouterr().err
    assert main(["fit", "--model", "NoSuchNet", "--images", ws["labeled"], "--classes",
                 ws["classes"], "--out", str(tmp_path / "o"), "-q"]) == 3
    assert main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(tmp_path / "o"), "--tau-t", "0",
                 "--workers", "0", "--cache-dir", ws["cache"], "-q"]) == 3
    assert "--tau-t must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fit", "--images", ws["labeled"]])
    assert e.value.code == 2


def test_cache_resume_and_staleness(ws, tmp_path):
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["flat"])
    cache_dir = str(tmp_path / "cache")
    calls = []
    real = clip.model.encode_image

    def counting(x, **kw):
        calls.append(len(x))
        return real(x, **kw)

    clip.model.encode_image = counting
    kw = dict(cache_dir=cache_dir, batch_size=2, workers=0, shard_size=3, progress=False)
    # A "killed" extraction: only shard 0 gets written.
    f, ok, cache = clip_mod.image_features(clip, images, shard_filter=lambda i: i == 0, **kw)
    assert f is None and cache.missing_shards() == [1, 2]
    assert sum(calls) == 3
    calls.clear()
    feats, ok, cache2 = clip_mod.image_features(clip, images, **kw)
    assert cache2.dir == cache.dir and sum(calls) == 5      # only the 5 missing images
    calls.clear()
    again, _, _ = clip_mod.image_features(clip, images, **kw)
    assert sum(calls) == 0 and torch.equal(again, feats)    # fully cached
    fresh, _, _ = clip_mod.image_features(clip, images, use_cache=False, **kw)
    torch.testing.assert_close(fresh, feats)
    assert ok.all() and feats.shape == (8, 512)
    # Any block of rows reads only the shards holding it (what a torchrun rank loads). The
    # use_cache=False run above rewrote the shards, whose values may differ from ``feats`` in
    # the last bit (another batching): blocks are held to the whole cache as it is now
    whole, _ = cache2.load()
    torch.testing.assert_close(whole, feats)
    for rows in (range(2, 7), range(3, 6), range(7, 8), range(0, 8), range(4, 4)):
        part, part_ok = cache2.load(rows)
        assert torch.equal(part, whole[rows.start:rows.stop]), rows
        assert torch.equal(part_ok, ok[rows.start:rows.stop]), rows
    assert torch.equal(cache2.load_ok(), ok)

    # Stale features are never reused: changed image list, changed file, model, preprocessing.
    fewer = list_images(ws["flat"])
    fewer.paths = fewer.paths[:-1]
    assert FeatureCache(cache_dir, cache.identity_base, fewer.paths, 3).key != cache.key
    touched = images.paths[0]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert FeatureCache(cache_dir, cache.identity_base, images.paths, 3).key != cache.key
    finally:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the old size and modification time restored (cp -p, rsync -a): the change time tells
    assert os.stat(touched).st_mtime_ns == st.st_mtime_ns
    restored = FeatureCache(cache_dir, cache.identity_base, images.paths, 3)
    assert restored.key != cache.key
    assert FeatureCache(cache_dir, cache.identity_base, images.paths, 3).key == restored.key
    for field, value in [("model", "ViT-B-16"), ("weights", "tag:openai"),
                         ("preprocess", "Compose(Resize(336))")]:
        other = dict(cache.identity_base, **{field: value})
        assert FeatureCache(cache_dir, other, images.paths, 3).key != cache.key, field


def test_killed_extraction_resumes(ws, tmp_path):
    """An extraction that dies in its third shard keeps the two finished shards; the rerun
    computes only the rest."""
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["flat"])
    real = clip.model.encode_image
    seen = []

    def dies_in_third_shard(x, **kw):
        if sum(seen) >= 6:
            raise KeyboardInterrupt("killed")
        seen.append(len(x))
        return real(x, **kw)

    clip.model.encode_image = dies_in_third_shard
    kw = dict(cache_dir=str(tmp_path / "cache"), batch_size=3, workers=0, shard_size=3,
              progress=False)
    with pytest.raises(KeyboardInterrupt):
        clip_mod.image_features(clip, images, **kw)
    clip.model.encode_image = real
    cache = FeatureCache(kw["cache_dir"], {"model": MODEL, "weights": clip.weights_id,
                                           "preprocess": repr(clip.preprocess),
                                           "precision": "fp32"}, images.paths, 3)
    assert cache.missing_shards() == [2]
    assert not [f for f in os.listdir(cache.dir) if ".tmp" in f]     # no partial shard left
    calls = []
    clip.model.encode_image = lambda x, **k: calls.append(len(x)) or real(x, **k)
    feats, ok, _ = clip_mod.image_features(clip, images, **kw)
    assert sum(calls) == 2 and feats.shape == (8, 512)


def test_classifier_module_matches_fit(ws, tmp_path):
    out = tmp_path / "out"
    assert main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(out), "--workers", "0",
                 "--cache-dir", ws["cache"], "--iters", "20", "-q"]) == 0
    res = load_vision_proxy(out / "proxy.safetensors")
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    head = VisionProxyClassifier.from_file(out / "proxy.safetensors", clip_model=clip.model,
                                           model_name=MODEL)
    assert head.classnames == CLASSES
    images = list_images(ws["labeled"], CLASSES)
    feats, ok, _ = clip_mod.image_features(clip, images, cache_dir=ws["cache"], workers=0,
                                           progress=False)
    logits = head(feats[ok])
    assert torch.equal(logits.argmax(1), res.predict(feats[ok]))
    from PIL import Image

    x = torch.stack([clip.preprocess(Image.open(p).convert("RGB"))
                     for p in images.paths[:2]])
    with torch.no_grad():
        torch.testing.assert_close(head(x), head(clip.model.encode_image(x)))
    for dt in (torch.float16, torch.bfloat16, torch.float64):   # the module cast, as heads are
        cast = VisionProxyClassifier.from_file(out / "proxy.safetensors").to(dt)
        got = cast(feats[ok].to(dt))
        assert got.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        assert float((got.argmax(1) == logits.argmax(1)).float().mean()) >= 0.9
    with pytest.raises(ValueError, match="fitted with model 'ViT-B-32', not 'RN50'"):
        VisionProxyClassifier.from_file(out / "proxy.safetensors", model_name="RN50")
    with pytest.raises(ValueError, match="D=1024 but the proxy has D=512"):
        VisionProxyClassifier.from_file(out / "proxy.safetensors",
                                        clip_model=open_clip.create_model("RN50"))


def _torchrun(args, tmp_path, nproc=2):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "inmap_ext"] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(tmp_path))


def test_torchrun_sharded_extract_and_fit(ws, tmp_path):
    """torchrun splits the image list across ranks (each rank writes its own cache shards) and
    fit runs sharded; the cache and the proxy equal the single-process ones."""
    cache = str(tmp_path / "cache")
    out = _torchrun(["extract", "--model", MODEL, "--pretrained", ws["ckpt"], "--images",
                     ws["labeled"], "--cache-dir", cache, "--workers", "0", "--shard-size", "3",
                     "-q"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["labeled"], labels="none")
    single, ok, c = clip_mod.image_features(clip, images, cache_dir=str(tmp_path / "c1"),
                                            workers=0, shard_size=3, progress=False)
    shared = FeatureCache(cache, c.identity_base, images.paths, 3)
    assert shared.missing_shards() == [] and shared.n_shards == 5
    feats, ok2 = shared.load()
    assert torch.equal(ok, ok2)
    torch.testing.assert_close(feats, single, rtol=1e-4, atol=1e-5)   # same rows, same order

    dist_out = tmp_path / "dist"
    out = _torchrun(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images",
                     ws["labeled"], "--classes", ws["classes"], "--out", str(dist_out),
                     "--cache-dir", cache, "--workers", "0", "--iters", "40", "--solver", "gd",
                     "-q"], tmp_path)      # gd: a rounding-stable path (test_streaming.py)
    assert out.returncode == 0, out.stderr[-3000:]
    assert main(["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(tmp_path / "one"), "--cache-dir",
                 cache, "--workers", "0", "--iters", "40", "--solver", "gd", "-q"]) == 0
    a = load_vision_proxy(dist_out / "proxy.safetensors")
    b = load_vision_proxy(tmp_path / "one" / "proxy.safetensors")
    torch.testing.assert_close(a.proxy, b.proxy, rtol=1e-4, atol=1e-4)
    rep = json.loads((dist_out / "report.json").read_text())
    assert rep["n_used"] == 12 and 0 < rep["descent"]["n_iters"] <= 40


# ---- the CLI as a new user meets it --------------------------------------------------------

def _fit_args(ws, tmp_path, *extra):
    return ["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
            "--classes", ws["classes"], "--out", str(tmp_path / "o"), "--workers", "0",
            "--cache-dir", ws["cache"], "-q", *extra]


@pytest.mark.parametrize("option,value,message", [
    ("--tau-t", "0", "--tau-t must be a finite number > 0"),
    ("--alpha", "2", "--alpha must be a number in [0, 1]"),
    ("--iters", "-1", "--iters must be an integer >= 0"),
    ("--batch-size", "0", "--batch-size must be an integer >= 1"),
    ("--class-prior", "balanced", "--class-prior must be one of"),
    ("--stop", "early", "--stop must be auto or none"),
    ("--device", "tpu", "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    ("--prompts", "no_such_prompts.json", "--prompts no_such_prompts.json: no such file"),
])
def test_option_errors_come_before_any_work(tmp_path, capsys, option, value, message):
    # the model does not even exist: an option error must be reported before it is looked up
    assert main(["fit", "--model", "NoSuchNet", "--images", str(tmp_path / "missing"),
                 "--classes", "imagenet", "--out", str(tmp_path / "o"), "-q",
                 option, value]) == 3
    assert message in capsys.readouterr().err


def test_option_conflicts_and_demo_sizes_come_before_any_work(tmp_path, capsys):
    prior = tmp_path / "prior.txt"
    prior.write_text("a 1\nb 1\n")
    for cp in ("estimate", str(prior)):
        assert main(["fit", "--model", "NoSuchNet", "--images", str(tmp_path / "missing"),
                     "--classes", "imagenet", "--out", str(tmp_path / "o"), "-q",
                     "--sinkhorn-iters", "0", "--class-prior", cp]) == 3
        assert "--sinkhorn-iters 0 turns balancing off" in capsys.readouterr().err
    assert main(["demo", "--n", "0", "--no-pipeline"]) == 3
    err = capsys.readouterr()
    assert "--n must be an integer >= 1" in err.err and err.out == ""   # nothing printed first


def test_extract_checks_images_before_loading_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(clip_mod, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["extract", "--model", MODEL, "--pretrained", "none", "--images",
                 str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c"), "-q"]) == 3
    assert "--images" in capsys.readouterr().err


def test_class_prior_file_listing_a_class_twice_is_refused(tmp_path):
    f = tmp_path / "prior.txt"
    f.write_text("cat 1\ndog 1\ncat 3\n")
    with pytest.raises(ValueError, match="class 'cat' is listed twice"):
        pipeline.read_class_weights(str(f), ["cat", "dog"])


def test_predict_topk_checked_before_work(tmp_path, capsys):
    assert main(["predict", "--proxy", str(tmp_path / "missing.safetensors"), "--images",
                 str(tmp_path), "--out", str(tmp_path / "p.csv"), "--topk", "0"]) == 3
    assert "--topk must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_device_cuda_without_gpu_is_a_clean_input_error(ws, tmp_path, capsys):
    assert main(_fit_args(ws, tmp_path, "--device", "cuda")) == 3
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and "Traceback" not in err
    # where --device is unused (the commands that run on the CPU) it is accepted, as --help says
    assert main(["cache", "--device", "cuda", "--cache-dir", str(tmp_path / "c")]) == 0


def test_not_a_proxy_file_and_not_a_checkpoint(ws, tmp_path, capsys):
    pickled = tmp_path / "proxy.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    assert main(["predict", "--proxy", str(pickled), "--images", ws["labeled"], "--out",
                 str(tmp_path / "p.csv"), "--workers", "0", "-q"]) == 3
    assert "is not a safetensors vision proxy written by inmap" in capsys.readouterr().err
    text = tmp_path / "weights.txt"
    text.write_text("these are not weights\n")
    assert main(["fit", "--model", MODEL, "--pretrained", str(text), "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", str(tmp_path / "o"), "--workers", "0",
                 "--cache-dir", ws["cache"], "-q"]) == 3
    assert "is not a checkpoint open_clip can load" in capsys.readouterr().err


def test_debug_shows_the_traceback(ws, tmp_path, capsys, monkeypatch):
    text = tmp_path / "weights.txt"
    text.write_text("nope\n")
    args = ["fit", "--model", MODEL, "--pretrained", str(text), "--images", ws["labeled"],
            "--classes", ws["classes"], "--out", str(tmp_path / "o"), "--workers", "0", "-q"]
    assert main(args) == 3 and "Traceback" not in capsys.readouterr().err
    assert main(args + ["--debug"]) == 3 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("INMAP_DEBUG", "1")
    assert main(args) == 3 and "Traceback" in capsys.readouterr().err


def test_help_texts(capsys):
    from inmap_ext.cli import DEFAULT_WORKERS, build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "130 interrupted" in " ".join(capsys.readouterr().out.split())
    for cmd in ("fit", "predict", "eval", "extract", "export", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert "(None)" not in out, cmd
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "classes per image" in out and "images per encoder batch" in out
    args = build_parser().parse_args(["fit", "--model", "m", "--images", "i", "--classes", "c",
                                      "--out", "o"])
    assert args.workers == DEFAULT_WORKERS == min(4, len(os.sched_getaffinity(0)))


def test_fit_report_class_prior_stop_and_file_modes(ws, tmp_path):
    weights = tmp_path / "prior.txt"
    weights.write_text("red 2\ngreen 1\n")              # blue not listed: known absent
    assert main(_fit_args(ws, tmp_path, "--iters", "40", "--class-prior", str(weights))) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["class_prior"]["chosen"] == "given" and report["mode"] == "default"
    assert report["class_prior"]["given_file"] == str(weights)     # which file, what it gave
    assert report["class_prior"]["given_proportions"] == pytest.approx(
        {"red": 2 / 3, "green": 1 / 3, "blue": 0.0}, abs=1e-6)
    assert report["model_precision"] == "fp32"
    assert report["descent"]["how_it_ended"] and len(report["descent"]["objective"]) == \
        report["descent"]["n_iters"]
    assert report["pseudo_labels"]["classes_without_pseudo_label"] >= 1   # blue: zero mass
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "o" / "proxy.safetensors").st_mode & 0o777 == 0o666 & ~mask
    shards = [os.path.join(d, f) for d, _, fs in os.walk(ws["cache"]) for f in fs
              if f.endswith(".safetensors")]
    assert shards and all(os.stat(p).st_mode & 0o777 == 0o666 & ~mask for p in shards)
    assert main(_fit_args(ws, tmp_path, "--iters", "15", "--mode", "paper")) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["mode"] == "paper" and report["class_prior"]["chosen"] == "uniform"
    assert report["descent"]["n_iters"] == 15
    assert main(_fit_args(ws, tmp_path, "--mode", "paper", "--class-prior", "estimate")) == 3


def test_shard_size_does_not_decide_the_cache_key(ws, tmp_path):
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["flat"])
    kw = dict(cache_dir=str(tmp_path / "cache"), batch_size=2, workers=0, progress=False)
    feats, _, cache = clip_mod.image_features(clip, images, shard_size=3, **kw)
    calls = []
    real = clip.model.encode_image
    clip.model.encode_image = lambda x, **k: (calls.append(len(x)), real(x, **k))[1]
    again, _, cache2 = clip_mod.image_features(clip, images, shard_size=4096, **kw)
    assert cache2.dir == cache.dir and cache2.shard_size == 3 and sum(calls) == 0
    assert torch.equal(again, feats)


def test_log_json_lines_carry_third_party_warnings(ws, tmp_path, capsys, monkeypatch):
    import logging
    import warnings

    real = clip_mod.load_model

    def noisy(*a, **k):
        logging.getLogger().warning("a library's plain warning line")   # as open_clip does
        warnings.warn("a python warning", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(clip_mod, "load_model", noisy)
    args = _fit_args(ws, tmp_path, "--iters", "5")
    args.remove("-q")
    assert main(args + ["--log", "json"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    events = [json.loads(ln) for ln in lines]                 # every line is JSON
    msgs = [e.get("text", "") for e in events if e["event"] == "warning"]
    assert "a library's plain warning line" in msgs
    assert "UserWarning: a python warning" in msgs
    assert main(args + ["-q"]) == 0
    assert capsys.readouterr().err == ""                       # quiet means quiet


def test_imagefolder_matching_no_class_is_an_error(ws, tmp_path, capsys):
    other = tmp_path / "classes_other.txt"
    other.write_text("cat\ndog\n")
    args = ["fit", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["labeled"],
            "--classes", str(other), "--out", str(tmp_path / "o"), "--workers", "0",
            "--cache-dir", ws["cache"], "--iters", "5", "-q"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "no folder matches a class name" in err and "'red'" in err and "'cat'" in err
    assert main(args + ["--labels", "none"]) == 0


def test_predict_on_other_weights_needs_force(ws, tmp_path, capsys):
    assert main(_fit_args(ws, tmp_path, "--iters", "5")) == 0
    torch.manual_seed(1)
    other = tmp_path / "other_random.pt"
    torch.save(open_clip.create_model(MODEL, pretrained=None).state_dict(), other)
    capsys.readouterr()
    args = ["predict", "--proxy", str(tmp_path / "o" / "proxy.safetensors"), "--pretrained",
            str(other), "--images", ws["labeled"], "--out", str(tmp_path / "p.csv"),
            "--workers", "0", "--cache-dir", ws["cache"]]
    assert main(args) == 3                      # an input error unless forced
    assert "fitted on other weights" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert "fitted on other weights" in capsys.readouterr().err


def test_resume_says_what_it_found_and_small_sets_resume(ws, tmp_path, capsys):
    from inmap_ext.cache import default_shard_size

    # the unit of resumption: ~1/32 of the images, so a small set keeps most of a killed run
    assert default_shard_size(500) == 32 and default_shard_size(10_000) == 313
    assert default_shard_size(8) == 32 and default_shard_size(10**7) == 4096
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["flat"])
    cache = str(tmp_path / "cache")
    # a killed extraction that wrote its first shard of 3 images (of 8)
    clip_mod.image_features(clip, images, cache_dir=cache, workers=0, shard_size=3,
                            progress=False, shard_filter=lambda i: i == 0)
    args = ["extract", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", ws["flat"],
            "--cache-dir", cache, "--workers", "0"]
    capsys.readouterr()
    assert main(args + ["--log", "json"]) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["cached"] == 3 and resume[0]["n"] == 8
    assert main(args) == 0
    assert "features: all 8 images cached" in capsys.readouterr().err


def test_pretrained_none_is_one_seeded_model(ws, tmp_path):
    """Random weights are drawn from a fixed seed that is part of the cache key: a fit that
    reuses the cache equals one that recomputes every feature."""
    a, b = clip_mod.load_model(MODEL, "none"), clip_mod.load_model(MODEL, None)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "seed=0" in a.weights_id and a.weights_id == b.weights_id
    assert clip_mod.load_model(MODEL, "none", seed=1).weights_id != a.weights_id
    state = torch.get_rng_state()
    clip_mod.load_model(MODEL, None)
    assert torch.equal(torch.get_rng_state(), state)          # the caller's RNG is untouched
    reports = []
    for extra in ([], ["--no-cache"]):
        out = tmp_path / f"o{len(reports)}"
        assert main(["fit", "--model", MODEL, "--pretrained", "none", "--images", ws["labeled"],
                     "--classes", ws["classes"], "--out", str(out), "--workers", "0",
                     "--cache-dir", str(tmp_path / "cache"), "--iters", "10", "-q", *extra]) == 0
        reports.append(load_vision_proxy(out / "proxy.safetensors"))
    torch.testing.assert_close(reports[0].text_proxies, reports[1].text_proxies)
    torch.testing.assert_close(reports[0].proxy, reports[1].proxy, rtol=1e-4, atol=1e-5)


def test_missing_and_unreadable_files_are_named(ws, tmp_path, capsys):
    good = list_images(ws["flat"]).paths[:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(good + [str(tmp_path / "gone.jpg"),
                                     os.path.join(ws["labeled"], "green", "broken.jpg")]) + "\n")
    args = _fit_args(ws, tmp_path, "--iters", "5")
    args.remove("-q")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 unreadable, skipped: " in err and "broken.jpg" in err
    assert main(["predict", "--proxy", str(tmp_path / "o" / "proxy.safetensors"), "--images",
                 str(lst), "--out", str(tmp_path / "p.csv"), "--workers", "0", "--cache-dir",
                 ws["cache"], "--log", "json"]) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    missing = [e for e in events if e["event"] == "missing"]
    assert missing and missing[0]["missing"] == [str(tmp_path / "gone.jpg")]
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["n_images"] == 5 and report["n_used"] == 3 and report["n_skipped"] == 2
    assert {os.path.basename(p) for p in report["skipped"]} == {"gone.jpg", "broken.jpg"}
    assert len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 3
    lst.write_text(str(tmp_path / "gone.jpg") + "\n")
    assert main(["predict", "--proxy", str(tmp_path / "o" / "proxy.safetensors"), "--images",
                 str(lst), "--out", str(tmp_path / "p.csv"), "-q"]) == 3
    assert "none of the 1 listed paths exists" in capsys.readouterr().err


def test_cache_lists_entries_and_clears_one(ws, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    for images in (ws["flat"], ws["labeled"]):
        assert main(["extract", "--model", MODEL, "--pretrained", ws["ckpt"], "--images",
                     images, "--cache-dir", cache, "--workers", "0", "-q"]) == 0
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-m", "inmap_ext", "cache", "--cache-dir", cache],
                             capture_output=True, text=True, timeout=300)   # the command itself
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "2 feature set(s)" in out and out.count(MODEL) == 2
    lines = [ln for ln in out.splitlines() if MODEL in ln]
    assert any(" 8 " in ln and ln.rstrip().endswith("flat") for ln in lines)
    assert any(" 13 " in ln and ln.rstrip().endswith("labeled") for ln in lines)
    flat_key = next(ln.split()[0] for ln in lines if ln.rstrip().endswith("flat"))
    assert main(["cache", "--cache-dir", cache, "--clear", "no-such-key"]) == 3
    assert "matches 0 cache entries" in capsys.readouterr().err
    assert main(["cache", "--cache-dir", cache, "--clear", flat_key[:8]]) == 0
    assert "removed 1 cached feature set(s)" in capsys.readouterr().out
    from inmap_ext.cache import list_entries

    left = list_entries(cache)
    assert [e.n_images for e in left] == [13] and left[0].complete
    assert main(["cache", "--cache-dir", cache, "--clear"]) == 0
    assert list_entries(cache) == []


def test_demo_shows_a_bar_per_fit(capsys):
    from inmap_ext.demo import synthetic_comparison

    rows = synthetic_comparison(n=300, d=16, c=5, iters=30, devices=["cpu"])
    err = capsys.readouterr().err
    assert "vision proxy" in err and "step" in err         # tqdm's live bar
    assert len(rows) >= 2 and all(r["steps"] <= 30 for r in rows)


# ---- the review of 2026-11-30: files, names and damaged caches ----------------------------------

def test_weights_fingerprint_hashes_the_whole_file_once(tmp_path, monkeypatch):
    from inmap_ext import cache as cache_mod

    memo = str(tmp_path / "memo")
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytearray(20 << 20)                     # 20 MiB; they differ in the middle only
    a.write_bytes(bytes(data))
    data[10 << 20] = 1
    b.write_bytes(bytes(data))
    fa = cache_mod.file_fingerprint(str(a), memo)
    assert fa != cache_mod.file_fingerprint(str(b), memo)
    # a later run (a new process: the in-process memo is empty) reads the hash from the memo
    monkeypatch.setattr(cache_mod, "_FILE_IDS", {})
    monkeypatch.setattr(cache_mod.hashlib, "blake2b", lambda **k: pytest.fail("hashed again"))
    assert cache_mod.file_fingerprint(str(a), memo) == fa
    monkeypatch.undo()
    a.write_bytes(bytes(data))                     # rewritten: a new version, hashed again
    assert cache_mod.file_fingerprint(str(a), memo) == cache_mod.file_fingerprint(str(b), memo)


def test_folder_links_are_entered_once(tmp_path):
    make_image_folder(str(tmp_path / "set"), ["cat", "dog"], per_class=1, size=16)
    os.symlink("..", tmp_path / "set" / "cat" / "loop")          # a link back up the tree
    os.symlink(tmp_path / "set" / "dog", tmp_path / "set" / "cat" / "dog_again")
    s = list_images(str(tmp_path / "set"), ["cat", "dog"], "folder")
    assert len(s) == 2 and sorted(s.labels) == [0, 1]


def test_a_link_to_an_image_listed_elsewhere_counts_once(tmp_path):
    make_image_folder(str(tmp_path / "set"), ["cat", "dog"], per_class=2, size=16)
    cat = sorted((tmp_path / "set" / "cat").iterdir())
    os.symlink(cat[0], tmp_path / "set" / "dog" / "z_link.png")     # after its target
    os.symlink(cat[1], tmp_path / "set" / "cat" / "0-first.png")    # before its target
    os.symlink(cat[0], tmp_path / "set" / "a_preview.png")          # a loose link at the top
    s = list_images(str(tmp_path / "set"), ["cat", "dog"], "folder")
    # the files' own paths are kept, whichever way the walk meets the links first: every image
    # once, in its own class folder
    assert sorted(s.paths) == sorted(str(p) for p in cat) + sorted(
        str(p) for p in (tmp_path / "set" / "dog").iterdir() if not p.is_symlink())
    assert sorted(s.labels) == [0, 0, 1, 1] and s.ignored == []
    assert sorted(os.path.basename(p) for p in s.repeated) == ["0-first.png", "a_preview.png",
                                                               "z_link.png"]
    # two dangling links (to the same missing file) stay listed: opening them names them
    for name in ("y_broken.png", "y_broken2.png"):
        os.symlink(tmp_path / "nowhere.png", tmp_path / "set" / "dog" / name)
    assert len(list_images(str(tmp_path / "set"), ["cat", "dog"], "folder")) == 6
    # only links: the first in walk order is kept
    (tmp_path / "solo").mkdir()
    os.symlink(cat[0], tmp_path / "solo" / "b.png")
    os.symlink(cat[0], tmp_path / "solo" / "a.png")
    s = list_images(str(tmp_path / "solo"), labels="none")
    assert [os.path.basename(p) for p in s.paths] == ["a.png"] and len(s.repeated) == 1


def test_a_file_name_that_is_not_utf8_is_kept(tmp_path):
    from inmap_ext.cache import image_fingerprints, images_fingerprint

    make_image_folder(str(tmp_path / "set"), ["cat"], per_class=1, size=16, labeled=False)
    name = os.fsdecode(b"caf\xe9.png")                          # Latin-1 bytes
    src = next(p for p in (tmp_path / "set").iterdir())
    os.rename(src, os.path.join(str(tmp_path / "set"), name))
    s = list_images(str(tmp_path / "set"))
    assert len(s) == 1 and images_fingerprint(s.paths) and image_fingerprints(s.paths)[0]
    out = tmp_path / "p.csv"
    pipeline.write_predictions(str(out), s.paths, ["cat"],
                               (torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long)))
    assert b"caf\xe9.png" in out.read_bytes()


def test_cache_listing_prints_a_folder_name_that_is_not_utf8():
    from inmap_ext.cli import _shown

    assert _shown(os.fsdecode(b"/data/caf\xe9")) == "/data/caf\ufffd"
    assert _shown("/data/café") == "/data/café"


def test_file_lists_comments_repeats_and_dot_dot(tmp_path):
    """Indented comments are comments; a file listed twice (under any spelling) is an error;
    '..' is resolved by the file system, as the OS does (through links)."""
    make_image_folder(str(tmp_path / "data"), ["cat", "dog"], per_class=1, size=16)
    a, b = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*.png"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "l.txt").write_text(f"  # an indented comment\n../{a}\n../lists/../{b}\n")
    s = list_images(str(lists / "l.txt"), ["cat", "dog"], "folder")
    assert [os.path.realpath(p) for p in s.paths] == [str(tmp_path / a), str(tmp_path / b)]
    assert sorted(s.labels) == [0, 1] and not s.missing
    (lists / "l.txt").write_text(f"../{a}\n# a comment\n../{b}\n../data/../{a}\n")
    with pytest.raises(ValueError, match=r"is listed twice \(lines 1 and 4\)"):
        list_images(str(lists / "l.txt"))


def test_builtin_imagenet_names_are_distinct_and_prompt_as_open_clip():
    """open_clip's list says 'missile' and 'sunglasses' twice: the outputs get WordNet's names
    for one of each pair, the prompts keep open_clip's text."""
    import open_clip

    spec = clip_mod.load_classnames("imagenet")
    assert len(set(spec.names)) == len(spec.names) == 1000
    assert spec.prompt_names == list(open_clip.IMAGENET_CLASSNAMES)
    assert [spec.names[i] for i in (657, 744, 836, 837)] == \
        ["missile", "projectile", "sunglass", "sunglasses"]
    assert [i for i, (a, b) in enumerate(zip(spec.names, spec.prompt_names)) if a != b] == \
        [744, 836]


def test_imagenet_renames_reach_prompts_old_proxies_counts_and_prior_files(tmp_path):
    """A CuPL file keyed by open_clip's names still serves the renamed classes; a proxy fitted
    with open_clip's list is read with the distinct names; counts by a repeated name add up; a
    class-prior file with the built-in set says which class each ambiguous name is."""
    import open_clip

    spec = clip_mod.load_classnames("imagenet")
    text = list(open_clip.IMAGENET_CLASSNAMES)
    cupl = {c: [f"a photo of a {c}, number {i}"] for i, c in enumerate(text)}  # last one wins
    (tmp_path / "cupl.json").write_text(json.dumps(cupl))
    per_class = clip_mod.load_prompts(str(tmp_path / "cupl.json"), spec.names, spec.text_names)
    assert per_class["projectile"] == cupl["missile"] and per_class["sunglass"] == \
        cupl["sunglasses"] and len(per_class) == 1000
    assert clip_mod.distinct_imagenet(text) == spec.names
    assert clip_mod.distinct_imagenet(["a", "b"]) == ["a", "b"]
    from inmap_ext.result import VisionProxyResult

    old = VisionProxyResult.__new__(VisionProxyResult)        # a proxy fitted before the rename
    old.proxy, old.metadata = torch.zeros(4, 1000), {"classnames": json.dumps(text)}
    assert VisionProxyClassifier.from_result(old).classnames == spec.names
    idx = torch.tensor([0, 1, 1, 2])
    assert pipeline._counts_by_name(["red", "red", "blue"], idx) == {"red": 3, "blue": 1}
    said = []
    (tmp_path / "prior.txt").write_text("missile 1\nsunglass 2\n")
    hyper = pipeline._class_prior_option({"class_prior": str(tmp_path / "prior.txt")}, spec,
                                         lambda kind, msg, **kw: said.append(msg))
    w = hyper["class_prior"]
    assert w[657] > 0 and w[744] == 0 and w[836] > 0 and w[837] == 0
    assert any("'missile' is class 657" in m for m in said), said
    from inmap_ext.data import ImageSet

    for folders, noted in (({"sunglasses": 837, "tench": 0}, True), ({"tench": 0}, False)):
        said.clear()
        pipeline._imagenet_folders_note(spec, ImageSet("/x", [], folder_to_class=folders),
                                        lambda kind, msg, **kw: said.append(msg))
        assert bool(said) == noted, said


def test_a_class_map_with_two_folders_for_one_name_is_refused(tmp_path):
    f = tmp_path / "c.json"
    for names, shown in [(["missile", "cat", "missile"], "n1, n3 -> 'missile'"),
                         (["Sea lion", "cat", "sea_lion"], "n1, n3 -> 'Sea lion'")]:
        f.write_text(json.dumps({f"n{i + 1}": c for i, c in enumerate(names)}))
        with pytest.raises(ValueError, match=shown):
            clip_mod.load_classnames(str(f))


def test_damaged_cache_files_are_encoded_again(tmp_path):
    images = [str(tmp_path / f"{i}.png") for i in range(5)]
    for p in images:
        open(p, "wb").close()
    ident = {"model": "m", "weights": "w", "preprocess": "p", "precision": "fp32"}
    c = FeatureCache(str(tmp_path / "cache"), ident, images, 2)
    for i in range(c.n_shards):
        rows = c.shard_rows(i)
        c.write_shard(i, torch.ones(len(rows), 4), torch.ones(len(rows), dtype=torch.bool))
    assert c.missing_shards() == []
    with open(c.shard_path(1), "r+b") as f:                      # a crash mid-write
        f.truncate(os.path.getsize(c.shard_path(1)) - 7)
    assert c.missing_shards() == [1] and not os.path.exists(c.shard_path(1))
    with open(os.path.join(c.dir, "manifest.json"), "w") as f:  # an empty manifest
        f.write("")
    again = FeatureCache(str(tmp_path / "cache"), ident, images, 2)
    assert again.key == c.key and again.missing_shards() == [0, 1, 2]


def test_an_image_unreadable_for_a_passing_reason_is_read_by_the_next_run(ws, tmp_path,
                                                                        monkeypatch):
    """A read that failed for a passing reason (too many open files) is not remembered as a
    broken image: its shard serves the run, is marked, and the next run encodes it again; a
    broken file (not an image) is remembered and costs later runs nothing."""
    from inmap_ext import data as data_mod

    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    images = list_images(ws["flat"])
    kw = dict(cache_dir=str(tmp_path / "cache"), batch_size=4, workers=0, shard_size=3,
              progress=False)
    real = data_mod.ImageDataset.__getitem__
    flaky = images.paths[4]

    def emfile(self, i):
        if self.paths[self.indices[i]] != flaky:
            return real(self, i)
        real_open = data_mod.os.open        # what Image.open meets: EMFILE
        err = OSError(24, "Too many open files")
        assert data_mod.read_status(err) == data_mod.PASSING and real_open
        return torch.zeros(real(self, i)[0].shape), self.indices[i], data_mod.read_status(err)
    monkeypatch.setattr(data_mod.ImageDataset, "__getitem__", emfile)
    warned = []
    _, ok, cache = clip_mod.image_features(clip, images, log=lambda *a, **k: warned.append(a),
                                           **kw)
    assert not ok[4] and ok.sum() == 7 and cache.encode_again() == [1]
    assert any(a[0] == "warning" and "read again by the next" in a[1] for a in warned)
    monkeypatch.setattr(data_mod.ImageDataset, "__getitem__", real)
    feats, ok, cache = clip_mod.image_features(clip, images, **kw)
    assert ok.all() and cache.encode_again() == [] and torch.equal(cache.load_ok(), ok)
    fresh, _, _ = clip_mod.image_features(clip, images, use_cache=False, **kw)
    torch.testing.assert_close(feats, fresh)

    broken = list_images(ws["labeled"], CLASSES)
    _, ok, cache = clip_mod.image_features(clip, broken, **kw)
    assert int((~ok).sum()) == 1 and cache.encode_again() == []
    assert data_mod.read_status(ValueError("cannot identify image file")) == data_mod.BROKEN
    calls = []
    real_encode = clip.model.encode_image
    clip.model.encode_image = lambda x, **k: calls.append(len(x)) or real_encode(x, **k)
    clip_mod.image_features(clip, broken, **kw)
    assert calls == []


def test_cli_hyper_defaults_are_the_library_defaults():
    import inspect

    from inmap_ext import cli
    from inmap_ext.fit import fit_vision_proxy

    sig = inspect.signature(fit_vision_proxy).parameters
    for flag, dest, _, default, _ in cli.HYPER:
        assert default == sig[dest].default, flag


def test_class_weights_go_to_the_named_class(tmp_path):
    from inmap_ext.pipeline import read_class_weights

    names = ["red", "green", "sea lion", "blue"]
    (tmp_path / "w.txt").write_text("blue 3\n# note\nsea lion, 1\ngreen 2\n")
    (tmp_path / "w.json").write_text(json.dumps({"blue": 3, "sea lion": 1, "green": 2}))
    (tmp_path / "w.tsv").write_text("blue\t3\nsea lion\t1  # a comment\ngreen,\t2\n")
    for f in ("w.txt", "w.json", "w.tsv"):
        w = read_class_weights(str(tmp_path / f), names)
        assert w.tolist() == [0.0, 2.0, 1.0, 3.0], f


def test_cache_clear_refuses_an_ambiguous_key(tmp_path):
    from inmap_ext.cache import FeatureCache, clear_cache, list_entries

    imgs = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"x")
        imgs.append(str(p))
    ident = {"model": "m", "weights": "w", "preprocess": "p", "precision": "fp32"}
    FeatureCache(str(tmp_path / "c"), ident, imgs[:1], 1)
    FeatureCache(str(tmp_path / "c"), ident, imgs, 1)
    with pytest.raises(ValueError, match="matches 2 cache entries"):
        clear_cache(str(tmp_path / "c"), "")
    assert len(list_entries(str(tmp_path / "c"))) == 2


def test_labeled_images_are_found_as_users_name_them(ws, tmp_path, monkeypatch, capsys):
    """--labeled finds an image by its path as listed (a relative one also beside the labels
    file), its real path, a link, or a copy (the one image of that name and bytes); classes by
    name or by their folder in the --classes JSON map; a '#' inside a file name is part of it.
    Unknown classes and images, and labels of an image that could not be read, are input errors
    found before the model loads where they can be."""
    import shutil

    from inmap_ext.pipeline import match_labeled, parse_labeled

    images = list_images(ws["labeled"], CLASSES)
    ids = [p for p in images.paths if not p.endswith("broken.jpg")]
    red = [p for p in ids if os.sep + "red" + os.sep in p]
    folder = tmp_path / "few"
    (folder / "red").mkdir(parents=True)
    (folder / "n002").mkdir()
    shutil.copy(red[1], folder / "red" / os.path.basename(red[1]))        # a copy
    os.symlink(red[2], folder / "n002" / "linked.png")                      # a link
    fmap = {"n001": "red", "n002": "green"}
    idx, lab = match_labeled(parse_labeled(str(folder), CLASSES, fmap), ids, str(folder))
    assert sorted(zip(idx.tolist(), lab.tolist())) == sorted(
        [(ids.index(red[1]), 0), (ids.index(red[2]), 1)])
    # relative to the labels file; '#' in a name; comments after a space
    odd = tmp_path / "lists" / "a#1.png"
    odd.parent.mkdir()
    shutil.copy(red[0], odd)
    lab_file = tmp_path / "lists" / "labels.txt"
    lab_file.write_text("# header\na#1.png\tred  # the first\n"
                        f"{os.path.relpath(red[3], lab_file.parent)},Red\n"
                        f"red/{os.path.basename(red[2])},red\n")     # as in the image folder
    ids2 = ids + [str(odd)]
    idx, lab = match_labeled(parse_labeled(str(lab_file), CLASSES, roots=[ws["labeled"]]), ids2,
                             str(lab_file))
    assert idx.tolist() == [len(ids), ids.index(red[3]), ids.index(red[2])]
    assert lab.tolist() == [0, 0, 0]
    twins = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"]       # the same bytes twice
    for t in twins:
        t.parent.mkdir()
        shutil.copy(red[0], t)
    (folder / "red" / "x.png").write_bytes(twins[0].read_bytes())
    with pytest.raises(ValueError, match="has the bytes of 2 of the fit's images"):
        match_labeled(parse_labeled(str(folder), CLASSES, fmap), ids + [str(t) for t in twins],
                      str(folder))
    broken = next(p for p in images.paths if p.endswith("broken.jpg"))
    with pytest.raises(ValueError, match="names 2 of the fit's rows"):     # shards' repeats
        match_labeled([("x:1", "k", 1)], ["k", "j", "k"], "x")
    with pytest.raises(ValueError, match="could not be read and was skipped"):
        match_labeled([("x:1", broken, 1)], ids, "x", skipped=[broken])

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the labels were checked")

    monkeypatch.setattr(clip_mod, "load_model", no_model)
    for text, message in ((f"{red[0]}\tpurple\n", "class 'purple' is not in the class list"),
                          ("/nowhere.png\tred\n", "is not one of the fit's images")):
        lab_file.write_text(text)
        assert main(_fit_args(ws, tmp_path, "--labeled", str(lab_file))) == 3
        assert message in capsys.readouterr().err


def test_cli_check_exit_code_says_a_kernel_failed(monkeypatch):
    from inmap_ext import check
    from inmap_ext.cli import EXIT_CHECK_FAILED, main

    monkeypatch.setattr(check, "run_check", lambda devices=None, **k: [
        {"ok": False, "note": "", "device": "cpu"}])
    assert main(["check", "--device", "cpu"]) == EXIT_CHECK_FAILED


def test_check_reports_a_raising_kernel_and_a_broken_extension(monkeypatch, tmp_path, capsys):
    """A kernel that raises is a FAIL row (the other ops are still checked) and the --json file
    is strict JSON; an extension that failed to load fails the check with its error."""
    from inmap_ext import _ops, check
    from inmap_ext.cli import EXIT_CHECK_FAILED, EXIT_OK, main

    if not _ops.ext_available("cpu"):
        pytest.skip("compiled cpu kernels not built")
    real = _ops.op

    def op(name, backend):
        if name == "xt_softmax" and backend == "ext":
            def boom(*a):
                raise RuntimeError("illegal memory access")
            return boom
        if name == "softmax_column_lse" and backend == "ext":
            return lambda *a: real(name, backend)(*a) * float("nan")
        return real(name, backend)

    monkeypatch.setattr(_ops, "op", op)
    out = tmp_path / "c.json"
    assert main(["check", "--device", "cpu", "--json", str(out)]) == EXIT_CHECK_FAILED
    table = capsys.readouterr().out
    assert "FAIL raised RuntimeError: illegal memory access" in table
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert any(r["op"] == "topk_scores" and r["ok"] for r in rows)     # the rest still ran
    assert all(r["rel_err"] is None for r in rows if r["op"] == "softmax_column_lse")
    monkeypatch.setattr(_ops, "op", real)
    monkeypatch.setattr(_ops, "_LOAD_ERROR", ImportError("undefined symbol: _ZN2at6detail"))
    assert main(["check", "--device", "cpu"]) == EXIT_CHECK_FAILED
    assert "FAIL the compiled extension failed to load: ImportError: undefined symbol" in \
        capsys.readouterr().out
    monkeypatch.undo()
    assert check.run_check(["cpu"], verbose=False) and main(["check", "--device", "cpu"]) == EXIT_OK


def test_fit_labeled_file_and_folder_settle_the_class_prior(ws, tmp_path):
    """--labeled: a file of 'IMAGE<TAB or comma>CLASS' lines or a CLASS/IMAGE folder of some of
    the images; the report says what the labels decided, every fit states its assumption and
    counts its passes; bad labels are input errors (exit 3) naming the line."""
    red = sorted(os.path.join(ws["labeled"], "red", f) for f in os.listdir(
        os.path.join(ws["labeled"], "red")))
    blue = sorted(os.path.join(ws["labeled"], "blue", f) for f in os.listdir(
        os.path.join(ws["labeled"], "blue")) if f.endswith(".png"))
    lab = tmp_path / "labels.tsv"
    lab.write_text(f"# a few labels\n{red[0]}\tred\n{red[1]},Red\n{blue[0]}\tblue\n")
    assert main(_fit_args(ws, tmp_path, "--iters", "20", "--labeled", str(lab))) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    cp = report["class_prior"]
    assert set(cp["labeled"]) >= {"none", "uniform"}
    assert all(0 <= v["right"] <= 3 for v in cp["labeled"].values())
    assert cp["decided_by"] in ("labeled images", "unlabeled rule")
    assert cp["assumption"].startswith("Assumed:")
    p = report["passes"]
    assert p["total"] == p["decision"] + p["pseudo_labels"] + p["descent"] + \
        p["stopping_checks"] and p["descent"] == report["descent"]["n_iters"] <= 20
    folder = tmp_path / "labeled_folder"
    (folder / "red").mkdir(parents=True)
    os.symlink(red[2], folder / "red" / "a.png")
    assert main(_fit_args(ws, tmp_path, "--iters", "5", "--labeled", str(folder))) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert sum(v["right"] for v in report["class_prior"]["labeled"].values()) <= 3
    for text, code in ((f"{red[0]}\tpurple\n", 3), ("/nowhere.png\tred\n", 3),
                       (f"{red[0]}\tred\n{red[0]}\tblue\n", 3)):
        lab.write_text(text)
        assert main(_fit_args(ws, tmp_path, "--iters", "5", "--labeled", str(lab))) == code
    assert main(_fit_args(ws, tmp_path, "--labeled", str(lab), "--mode", "paper")) == 3
