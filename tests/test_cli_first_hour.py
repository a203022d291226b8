"""Issue #19, a new user's first hour, through the `inmap` command (offline: a real open_clip
architecture with random weights saved to a local checkpoint, generated image folders)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from inmap_ext import clip as clip_mod  # noqa: E402
from inmap_ext.cli import main  # noqa: E402
from inmap_ext.synthetic import make_image_folder  # noqa: E402

MODEL = "ViT-B-32"
CLASSES = ["red", "green", "blue"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_hour")
    torch.manual_seed(0)
    ckpt = root / "tiny_random.pt"
    torch.save(open_clip.create_model(MODEL, pretrained=None).state_dict(), ckpt)
    labeled = root / "labeled"
    make_image_folder(str(labeled), CLASSES, per_class=3, size=32)
    flat = root / "flat"
    make_image_folder(str(flat), ["purple", "orange", "yellow"], per_class=3, size=32,
                      labeled=False)
    classes = root / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return dict(root=root, ckpt=str(ckpt), labeled=str(labeled), flat=str(flat),
                classes=str(classes), cache=str(root / "cache"))


def _fit(ws, out, *extra, images=None, classes=None, pretrained=True):
    return ["fit", "--model", MODEL] + (["--pretrained", ws["ckpt"]] if pretrained else []) + [
        "--images", images or ws["labeled"], "--classes", classes or ws["classes"],
        "--out", str(out), "--workers", "0", "--cache-dir", ws["cache"], "--iters", "5", *extra]


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))       # ~/.cache/clip: empty


def _err_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


# ---- item 2: no silent random weights ---------------------------------------------------------

def test_no_pretrained_means_the_default_tag_not_random_weights(ws, tmp_path, capsys,
                                                                 monkeypatch):
    _offline(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    assert main(_fit(ws, tmp_path / "o", pretrained=False)) == 3
    assert time.perf_counter() - t0 < 20
    err = _err_lines(capsys)
    assert len(err) == 1, err                                  # one line, no retry lines
    assert "--pretrained openai" in err[0] and "default for ViT-B-32" in err[0]
    assert "--pretrained none for random weights" in err[0]
    assert not (tmp_path / "o").exists()
    assert clip_mod.default_pretrained(MODEL) == "openai"
    assert clip_mod.default_pretrained("ViT-B-32-256") == \
        open_clip.list_pretrained_tags_by_model("ViT-B-32-256")[0]


def test_a_tag_that_must_be_downloaded_fails_fast_offline(ws, tmp_path, capsys, monkeypatch):
    _offline(monkeypatch, tmp_path)
    for env_offline in (True, False):
        if not env_offline:          # no HF_HUB_OFFLINE: the host cannot be reached
            monkeypatch.delenv("HF_HUB_OFFLINE")
            monkeypatch.setattr(clip_mod, "_reachable", lambda host, timeout=3.0: False)
        t0 = time.perf_counter()
        assert main(_fit(ws, tmp_path / "o", "--pretrained", "laion2b_s34b_b79k",
                         pretrained=False)) == 3
        assert time.perf_counter() - t0 < 20
        err = _err_lines(capsys)
        assert len(err) == 1 and "--pretrained laion2b_s34b_b79k" in err[0], err
        assert ("HF_HUB_OFFLINE is set" if env_offline else "cannot be reached") in err[0]
    assert main(_fit(ws, tmp_path / "o", "--pretrained", "no_such_tag", pretrained=False)) == 3
    err = capsys.readouterr().err
    assert "neither a file nor an open_clip tag" in err and "openai" in err
    assert main(_fit(ws, tmp_path / "o", "--pretrained", str(tmp_path / "gone.pt"),
                     pretrained=False)) == 3
    assert "no such checkpoint file" in capsys.readouterr().err


def test_random_weights_only_when_asked_and_never_mixed_in_the_cache(ws, tmp_path, capsys):
    from inmap_ext.cache import list_entries

    cache = str(tmp_path / "cache")
    for pre in ("none", ws["ckpt"]):
        assert main(["extract", "--model", MODEL, "--pretrained", pre, "--images", ws["flat"],
                     "--cache-dir", cache, "--workers", "0", "-q"]) == 0
    weights = sorted(e.weights for e in list_entries(cache))
    assert len(weights) == 2 and weights[0].startswith("file:") and \
        weights[1].startswith("random-init")
    assert main(_fit(ws, tmp_path / "o", "--pretrained", "none", "-q", pretrained=False)) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["pretrained"] == "none" and rep["weights_id"].startswith("random-init")
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_ = " ".join(capsys.readouterr().out.split())
    assert "Default: the model's 'openai' tag" in help_ and "never random unless asked" in help_


def test_unknown_model_is_reported_before_the_images_are_listed(tmp_path, capsys):
    assert main(["fit", "--model", "ViT-B-99", "--images", str(tmp_path / "missing"),
                 "--classes", "imagenet", "--out", str(tmp_path / "o"), "-q"]) == 3
    err = capsys.readouterr().err
    assert "--model 'ViT-B-99' is not an open_clip architecture" in err and "images" not in err


# ---- item 3: every output checked before the work ---------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["fit", "--out", "/proc/x"], "--out /proc/x: cannot write in /proc"),
    (["fit", "--out", "{file}"], "is an existing file; --out names a folder"),
    (["eval", "--out", "/proc/e.json"], "--out /proc/e.json: cannot write in /proc"),
    (["eval", "--out", "{dir}"], "is a folder; --out names a file"),
    (["predict", "--out", "/proc/p.csv"], "--out /proc/p.csv: cannot write in /proc"),
    (["export", "--out", "/proc/clf.pt"], "--out /proc/clf.pt: cannot write in /proc"),
    (["export", "--out", "{file}/clf.pt"], "is a file, not a folder"),
    (["check", "--json", "/proc/c.json"], "--json /proc/c.json: cannot write in /proc"),
])
def test_outputs_are_checked_before_the_model_loads(tmp_path, capsys, argv, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [a.format(file=afile, dir=tmp_path) for a in argv]
    cmd = argv[0]
    rest = {"fit": ["--model", "NoSuchNet", "--images", "missing", "--classes", "imagenet"],
            "eval": ["--model", "NoSuchNet", "--images", "missing", "--classes", "imagenet"],
            "predict": ["--proxy", "missing.safetensors", "--images", "missing"],
            "export": ["--proxy", "missing.safetensors"], "check": []}[cmd]
    # a model that does not exist, a proxy that does not exist: the output is reported first
    assert main(argv + rest) == 3
    err = capsys.readouterr().err
    assert message in err, err
    assert os.listdir(tmp_path) == ["afile"]                   # nothing left behind


OPTION_CHECK = r"""
import sys
from inmap_ext.cli import main
rc = main({argv!r})
assert "torch" not in sys.modules and "open_clip" not in sys.modules, "imported torch"
sys.exit(rc)
"""


@pytest.mark.parametrize("argv", [
    ["fit", "--model", "m", "--images", "i", "--classes", "c", "--out", "o", "--tau-t", "0"],
    ["fit", "--model", "m", "--images", "i", "--classes", "c", "--out", "/proc/o"],
    ["predict", "--proxy", "p", "--images", "i", "--out", "p.csv", "--topk", "0"],
    ["eval", "--model", "m", "--images", "i", "--classes", "c", "--mode", "nope"],
])
def test_option_errors_need_no_torch(tmp_path, argv):
    out = subprocess.run([sys.executable, "-c", OPTION_CHECK.format(argv=argv)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 3, out.stderr
    assert out.stderr.count("\n") == 1 and "error: --" in out.stderr, out.stderr


def test_version_needs_no_torch(tmp_path):
    code = ("import sys\nfrom inmap_ext.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=REPO), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("inmap_ext ")
    print(f"--version: {time.perf_counter() - t0:.2f}s")


def test_cli_choices_mirror_the_library():
    from inmap_ext import cli
    from inmap_ext._ops import BACKENDS
    from inmap_ext.class_prior import CLASS_PRIORS
    from inmap_ext.fit import MODES
    from inmap_ext.rows import PRECISIONS
    from inmap_ext.solver import SOLVERS, STOP_RULES

    assert (cli.BACKENDS, cli.PRECISIONS, cli.MODES, cli.CLASS_PRIORS, cli.STOP_RULES,
            cli.SOLVERS) == (BACKENDS, PRECISIONS, MODES, CLASS_PRIORS, STOP_RULES, SOLVERS)


# ---- item 4: nothing silent or misleading -----------------------------------------------------

def test_a_stray_image_beside_class_folders_is_left_out_with_a_warning(ws, tmp_path, capsys):
    from inmap_ext.data import list_images

    images = tmp_path / "imgs"
    shutil.copytree(ws["labeled"], images)
    shutil.copy(os.path.join(ws["flat"], sorted(os.listdir(ws["flat"]))[0]),
                images / "stray.png")
    assert main(_fit(ws, tmp_path / "o", images=str(images))) == 0
    err = capsys.readouterr().err
    assert "1 file(s) at the top level" in err and "stray.png" in err and "left out" in err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "inmap" in rep and rep["n_images"] == 9                  # labels are on
    assert [os.path.basename(p) for p in rep["ignored"]] == ["stray.png"]
    assert "repeated" not in rep
    # a link to an image already in the set: counted once, said, and named in the report
    first = sorted(p for p in os.listdir(images / "blue"))[0]
    os.symlink(images / "blue" / first, images / "red" / "zz_linked.png")   # walked after it
    assert main(_fit(ws, tmp_path / "o_link", images=str(images))) == 0
    err = capsys.readouterr().err
    assert "1 image file(s) under" in err and "zz_linked.png" in err, err
    rep = json.loads((tmp_path / "o_link" / "report.json").read_text())
    assert rep["n_images"] == 9
    assert [os.path.basename(p) for p in rep["repeated"]] == ["zz_linked.png"]
    os.remove(images / "red" / "zz_linked.png")
    # mostly loose files: unlabeled, and saying why
    for i in range(12):
        shutil.copy(images / "stray.png", images / f"loose_{i}.png")
    s = list_images(str(images), CLASSES)
    assert s.labels is None and "outside the class folders" in s.note


def test_predict_with_another_model_or_weights_is_an_error_unless_forced(ws, tmp_path, capsys):
    assert main(_fit(ws, tmp_path / "o", "-q")) == 0
    proxy = str(tmp_path / "o" / "proxy.safetensors")
    base = ["predict", "--proxy", proxy, "--images", ws["flat"], "--out",
            str(tmp_path / "p.csv"), "--workers", "0", "--cache-dir", ws["cache"]]
    assert main(base + ["--model", "ViT-B-16", "--pretrained", "none"]) == 3   # also D=512
    err = capsys.readouterr().err
    assert "fitted with --model ViT-B-32, not ViT-B-16" in err and "--force" in err
    torch.manual_seed(1)
    other = tmp_path / "other_random.pt"
    torch.save(open_clip.create_model(MODEL, pretrained=None).state_dict(), other)
    assert main(base + ["--pretrained", str(other)]) == 3
    assert "fitted on other weights" in capsys.readouterr().err
    assert main(base + ["--pretrained", str(other), "--force"]) == 0
    assert "fitted on other weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "p.report.json").read_text())["forced"] is True


def test_bad_text_files_name_the_file_and_line(ws, tmp_path, capsys):
    bad_json = tmp_path / "classes.json"
    bad_json.write_text('[\n  "red",\n  "green",,\n]\n')
    latin = tmp_path / "classes.txt"
    latin.write_bytes("red\ngreen\ncaf\xe9\n".encode("latin-1"))
    prior = tmp_path / "prior.json"
    prior.write_text('{"red": 1,\n "green" 2}\n')
    cases = [(_fit(ws, tmp_path / "o", classes=str(bad_json)), f"--classes {bad_json}:3:11: not valid JSON"),
             (_fit(ws, tmp_path / "o", classes=str(latin)), f"--classes {latin}:3: not UTF-8"),
             (_fit(ws, tmp_path / "o", "--class-prior", str(prior)),
              f"--class-prior {prior}:2:"),
             (_fit(ws, tmp_path / "o", "--prompts", str(prior)), f"--prompts {prior}:2:")]
    for argv, message in cases:
        assert main(argv + ["-q"]) == 3, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine without a GPU")
def test_fit_on_cuda_without_gpu_says_so():
    from inmap_ext import fit_vision_proxy
    from inmap_ext.synthetic import make_problem

    p = make_problem(100, 8, 3)
    with pytest.raises(ValueError, match="device='cuda': no CUDA device is available"):
        fit_vision_proxy(p.image_features, p.text_proxies, iters=2, device="cuda")


def test_cache_listing_into_a_closed_pipe_exits_quietly(tmp_path):
    cache = tmp_path / "cache"
    for i in range(800):       # more than a pipe buffer of listing
        d = cache / f"{i:024x}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"model": MODEL, "weights": "w", "n": "3",
                                                     "root": "/x", "shard_size": "3"}))
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + sys.executable +
                          f" -m inmap_ext cache --cache-dir {cache} | head -2"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and len(out.stdout.splitlines()) == 2


def test_file_list_report_names_the_list_eval_says_what_it_wrote(ws, tmp_path, capsys):
    from inmap_ext.data import list_images

    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(list_images(ws["labeled"]).paths[:3] +
                             list_images(ws["flat"]).paths[:3]) + "\n")
    assert main(_fit(ws, tmp_path / "o", "--labels", "none", images=str(lst))) == 0
    err = capsys.readouterr().err
    assert f"images: 6 listed in {lst}" in err
    assert json.loads((tmp_path / "o" / "report.json").read_text())["images"] == str(lst)
    # progress bars say what they count
    assert "text proxies" in err and "class" in err
    assert "image features" in err
    ev = tmp_path / "eval.json"
    assert main(["eval", "--model", MODEL, "--pretrained", ws["ckpt"], "--images",
                 ws["labeled"], "--classes", ws["classes"], "--out", str(ev), "--workers", "0",
                 "--cache-dir", ws["cache"], "--iters", "5"]) == 0
    assert f"wrote {ev} (4 records" in capsys.readouterr().err


def test_reprs_are_short(ws, tmp_path):
    from inmap_ext import VisionProxyClassifier, fit_vision_proxy, load_vision_proxy
    from inmap_ext.synthetic import make_problem

    p = make_problem(400, 64, 30)
    res = fit_vision_proxy(p.image_features, p.text_proxies, iters=7, mode="paper")
    r = repr(res)
    assert len(r) < 300 and "D=64 x C=30" in r and "steps=7" in r and "class_prior='uniform'" in r
    assert "tensor(" not in r
    assert main(_fit(ws, tmp_path / "o", "-q")) == 0
    res = load_vision_proxy(tmp_path / "o" / "proxy.safetensors")
    assert "model='ViT-B-32'" in repr(res) and len(repr(res)) < 300
    head = VisionProxyClassifier.from_result(res, clip_model=clip_mod.load_model(
        MODEL, ws["ckpt"]).model)
    h = repr(head)
    assert h == ("VisionProxyClassifier(D=512, C=3, classes=['red', 'green', 'blue'], "
                 "model='ViT-B-32', logit_scale=100, wraps=CLIP)")
    many = VisionProxyClassifier(p.text_proxies, [f"c{i}" for i in range(30)])
    assert "... 25 more]" in repr(many) and len(repr(many)) < 200


# ---- item 5: the cache keeps what it can ------------------------------------------------------

def test_adding_and_removing_images_re_encodes_only_those(ws, tmp_path, capsys):
    from inmap_ext.cache import FeatureCache
    from inmap_ext.data import list_images

    images = tmp_path / "imgs"
    shutil.copytree(ws["flat"], images)
    cache = str(tmp_path / "cache")
    args = ["extract", "--model", MODEL, "--pretrained", ws["ckpt"], "--images", str(images),
            "--cache-dir", cache, "--workers", "0", "--shard-size", "4", "--log", "json"]

    def run():
        assert main(args) == 0
        events = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        reuse = [e for e in events if e["event"] == "reuse"]
        feats = [e for e in events if e["event"] == "features"][0]
        return (reuse[0]["reused"], reuse[0]["encode"]) if reuse else (0, feats["n"])

    assert run() == (0, 9)
    names = sorted(os.listdir(images))
    os.remove(images / names[0])                                   # one removed
    shutil.copy(os.path.join(ws["labeled"], "red", "000.png"), images / "zz_new.png")  # one new
    assert run() == (8, 1)
    st = os.stat(images / names[3])                                # one changed
    os.utime(images / names[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run() == (8, 1)
    assert run() == (0, 9)                      # the same list again: its own entry, all cached
    # the reused rows equal freshly encoded ones
    clip = clip_mod.load_model(MODEL, ws["ckpt"])
    s = list_images(str(images))
    got, ok, c = clip_mod.image_features(clip, s, cache_dir=cache, workers=0, progress=False)
    fresh, ok2, _ = clip_mod.image_features(clip, s, cache_dir=cache, workers=0,
                                            progress=False, use_cache=False)
    assert torch.equal(ok, ok2)
    torch.testing.assert_close(got, fresh, rtol=1e-4, atol=1e-5)
    # another preprocessing (or model / weights) never shares rows
    other = FeatureCache(cache, dict(c.identity_base, preprocess="Compose(other)"), s.paths)
    assert other.reuse_plan(list(range(len(s)))) == {}


# ---- item 6: the report says how it was made ---------------------------------------------------

def test_report_carries_command_time_counts_and_coverage(ws, tmp_path, capsys):
    more = tmp_path / "classes4.txt"
    more.write_text("red\ngreen\nblue\ncyan\n")
    argv = _fit(ws, tmp_path / "o", classes=str(more))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "the image folders cover 3 of the 4 classes (no folder for cyan)" in err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["command"].startswith("inmap fit --model ViT-B-32") and \
        f"--classes {more}" in rep["command"]
    assert rep["timestamp"][:2] == "20" and "T" in rep["timestamp"]
    counts = rep["pseudo_labels"]["class_counts"]
    assert list(counts) == ["red", "green", "blue", "cyan"] and sum(counts.values()) == 9
    cov = rep["label_coverage"]
    assert cov["classes_with_images"] == 3 and cov["classes_without_images"] == ["cyan"]
    assert main(_fit(ws, tmp_path / "o2", "-q")) == 0
    assert "label_coverage" not in json.loads((tmp_path / "o2" / "report.json").read_text())


# ---- review of 2026-11-30 (fourth session): documented behaviour, checked --------------------

@pytest.mark.parametrize("flags,message", [
    (["--compute-precision", "fp16"], "--compute-precision fp16 needs --device cuda"),
    (["--backend", "triton"], "--backend triton: backend='triton' cannot run"),
    (["--compute-precision", "bf16x3", "--backend", "torch"],
     "--compute-precision bf16x3 needs --device cpu and the compiled CPU kernels: it runs in "
     "the compiled CPU kernels, not on --backend torch"),
])
def test_backend_and_precision_are_checked_against_the_device_before_any_work(
        tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the tests' CPU interpreter: off
    # images that do not exist: the option must be reported first, with the flag's name
    assert main(["fit", "--model", MODEL, "--pretrained", "none", "--images",
                 str(tmp_path / "missing"), "--classes", "imagenet", "--out",
                 str(tmp_path / "o"), *flags]) == 3
    err = capsys.readouterr().err
    assert message in err and "--images" not in err, err


@pytest.mark.parametrize("precision,probe,dtype,refusal", [
    ("bf16", "cpu_bf16_available", "bfloat16",
     "--compute-precision bf16 needs --device cuda (16-bit tensor-core GEMMs; bf16 also runs on "
     "a CPU where torch has MKL's bfloat16 GEMM, not in this install)"),
    ("bf16x3", "cpu_bf16x3_available", "float32",
     "--compute-precision bf16x3 needs --device cpu and the compiled CPU kernels: this install "
     "has no bfloat16 GEMM with float32 output on the CPU"),
])
def test_cpu_bfloat16_precisions_fit_where_torch_has_the_gemm_and_are_refused_early_elsewhere(
        ws, tmp_path, capsys, monkeypatch, precision, probe, dtype, refusal):
    from inmap_ext import _ops

    if getattr(_ops, probe)():
        assert main(_fit(ws, tmp_path / "o", "-q", "--compute-precision", precision)) == 0
        rep = json.loads((tmp_path / "o" / "report.json").read_text())
        assert rep["hyper"]["precision"] == precision
        assert rep["hyper"]["compute_dtype"] == dtype, rep["hyper"]
    monkeypatch.setattr(_ops, probe, lambda: False)
    assert main(["fit", "--model", MODEL, "--pretrained", "none", "--images",
                 str(tmp_path / "missing"), "--classes", "imagenet", "--out",
                 str(tmp_path / "o2"), "--compute-precision", precision]) == 3
    err = capsys.readouterr().err
    assert refusal in err, err


def test_predict_finds_its_weights_or_asks_for_them(ws, tmp_path, capsys, monkeypatch):
    from inmap_ext import fit_vision_proxy
    from inmap_ext.synthetic import make_problem

    # a relative checkpoint path is written as an absolute one: predict works from elsewhere
    shutil.copy(ws["ckpt"], tmp_path / "rel.pt")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INMAP_CACHE", str(tmp_path / "elsewhere"))
    assert main(["fit", "--model", MODEL, "--pretrained", "rel.pt", "--images", ws["labeled"],
                 "--classes", ws["classes"], "--out", "o", "--workers", "0", "--cache-dir",
                 str(cache), "--iters", "5", "-q"]) == 0
    from inmap_ext import load_vision_proxy

    saved = load_vision_proxy(tmp_path / "o" / "proxy.safetensors").metadata["pretrained"]
    assert saved == str(tmp_path / "rel.pt")
    # the checkpoint's fingerprint is remembered in the chosen cache folder, not the default
    assert (cache / "weights_fingerprints.json").is_file()
    assert not (tmp_path / "elsewhere").exists()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["predict", "--proxy", "../o/proxy.safetensors", "--images", ws["flat"],
                 "--out", "p.csv", "--workers", "0", "--cache-dir", str(cache), "-q"]) == 0
    rep = json.loads((tmp_path / "sub" / "p.report.json").read_text())
    assert rep["pretrained"] == str(tmp_path / "rel.pt")
    counts = rep["predicted_class_counts"]
    assert list(counts) == CLASSES and sum(counts.values()) == rep["n_used"] == 9
    # a proxy saved without the weights in its metadata: never random weights silently
    p = make_problem(20, 512, 3)
    fit_vision_proxy(p.image_features, p.text_proxies, iters=2).save(
        tmp_path / "plain.safetensors", metadata={"model": MODEL})
    assert main(["predict", "--proxy", str(tmp_path / "plain.safetensors"), "--images",
                 ws["flat"], "--out", "q.csv", "--workers", "0", "--cache-dir", str(cache)]) == 3
    assert "names no weights in its metadata: pass --pretrained" in capsys.readouterr().err
    assert not (tmp_path / "sub" / "q.csv").exists()
    # the weights named in the metadata are gone: the error says where the name came from
    os.remove(tmp_path / "rel.pt")
    assert main(["predict", "--proxy", "../o/proxy.safetensors", "--images", ws["flat"],
                 "--out", "p2.csv", "--workers", "0", "--cache-dir", str(cache)]) == 3
    err = capsys.readouterr().err
    assert "no such checkpoint file" in err and "from its metadata" in err, err


@pytest.mark.parametrize("argv", [["export", "--proxy", "missing.safetensors", "--out", "x.pt"],
                                  ["cache", "--clear", "nokey"],
                                  ["demo", "--n", "0"], ["check", "--device", "tpu"]])
def test_every_subcommand_takes_debug(tmp_path, capsys, argv):
    if argv[0] == "cache":
        argv = argv + ["--cache-dir", str(tmp_path)]
    assert main(argv + ["--debug"]) == 3
    assert "unrecognized arguments" not in capsys.readouterr().err


def test_inmap_acc5_is_reported_whatever_topk(ws, tmp_path, capsys):
    six = ["red", "green", "blue", "purple", "orange", "yellow"]
    make_image_folder(str(tmp_path / "six"), six, per_class=1, size=32)
    (tmp_path / "six.txt").write_text("\n".join(six) + "\n")
    assert main(_fit(ws, tmp_path / "o", "--topk", "1", "-q", images=str(tmp_path / "six"),
                     classes=str(tmp_path / "six.txt"))) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "acc5" in rep["zero_shot"] and "acc5" in rep["inmap"]
    header = (tmp_path / "o" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header == ["path", "label", "inmap_class_1", "inmap_cosine_1", "zero_shot_class_1",
                      "zero_shot_cosine_1"], header
