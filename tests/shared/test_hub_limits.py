"""Issue 17 items 8-11: bundles from elsewhere are checked before anything is allocated, downloads
give up, catalogue entries are pinned and stay inside the repository, stale partial downloads are
cleaned, a mistyped --adapter names the closest catalogue names, every bundle records its domain,
and bundle files get ordinary permissions."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

import shared.artifacts
from shared import backbones, hub, peft
from shared.heads import LinearHead

from .test_hub import FakeHub, _files, _make_bundle, _zip

REPO = Path(__file__).resolve().parents[2]
LABELS = ["dog", "rain", "siren"]


def _edit(path: Path, fn) -> None:
    meta = json.loads((path / "adapter.json").read_text())
    fn(meta)
    (path / "adapter.json").write_text(json.dumps(meta))


@pytest.fixture
def bundle(tiny, tmp_path):
    _, path = _make_bundle(tiny, tmp_path / "b")
    return path


@pytest.fixture
def builds(monkeypatch):
    """Every call of the tiny-vit constructor, by the default device it ran under ("meta" = a dry build)."""
    seen = []
    original = backbones.BACKBONES["tiny-vit"]

    @functools.wraps(original)
    def spy(*a, **kw):
        seen.append(torch.empty(()).device.type)
        return original(*a, **kw)

    monkeypatch.setitem(backbones.BACKBONES, "tiny-vit", spy)
    return seen


# ------------------------------------------------------------------------------ 8. crafted bundles
@pytest.mark.parametrize("kwargs,count", [
    ({"embed_dim": 1024, "depth": 8, "num_heads": 8}, "101,004,288"),  # 0.4 GB: what the old code allocated
    ({"embed_dim": 8192, "depth": 12, "num_heads": 8}, "9,666,895,872"),  # 39 GB: it would not survive this
], ids=["0.4GB", "39GB"])
def test_huge_backbone_is_refused_before_it_is_built(bundle, builds, kwargs, count):
    _edit(bundle, lambda m: m["backbone"]["kwargs"].update(kwargs))  # a few bytes of json
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(peft.BundleError) as err:
        peft.from_bundle(bundle)
    msg = str(err.value)
    assert str(bundle / "adapter.json") in msg and f"{count} parameters, more than the 75,000,000 allowed" in msg
    assert "PEFT_SUITE_MAX_BACKBONE_PARAMS" in msg
    assert builds == ["meta"]  # counted on the meta device, never built for real
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # KiB: no large allocation


def test_backbone_size_limit_from_env_or_argument(tiny, bundle, monkeypatch, builds):
    x = tiny.input("vit")
    monkeypatch.setenv("PEFT_SUITE_MAX_BACKBONE_PARAMS", "1000")
    with pytest.raises(peft.BundleError, match=r"32,352 parameters, more than the 1,000 allowed "
                                               r"\(PEFT_SUITE_MAX_BACKBONE_PARAMS=1000\)"):
        peft.from_bundle(bundle)
    assert builds == ["meta"]
    model = peft.from_bundle(bundle, max_params=40_000).eval()  # the argument wins over the environment
    assert builds == ["meta", "meta", "cpu"]
    with torch.no_grad():
        assert model(x).shape == (2, 3)
    monkeypatch.setenv("PEFT_SUITE_MAX_BACKBONE_PARAMS", "lots")
    with pytest.raises(peft.BundleError, match="PEFT_SUITE_MAX_BACKBONE_PARAMS='lots': expected a number"):
        peft.from_bundle(bundle)


@pytest.mark.parametrize("backbone_id,kwargs,words", [
    ("tiny-bird-mae", {"embed_dim": 32, "bogus": 1}, "backbone.kwargs.bogus: not an argument of backbone 'tiny-bird-mae'"),
    ("tiny-vit", {"bogus": 1}, "got an unexpected keyword argument 'bogus'"),  # passed on to timm, refused there
    ("dinov2", {"size": "x"}, "DINOv2 size must be one of"),
    ("nope", {}, "backbone 'nope' is not a registered backbone"),
])
def test_bad_backbone_kwargs_name_the_field_and_file(bundle, builds, backbone_id, kwargs, words):
    _edit(bundle, lambda m: m["backbone"].update(id=backbone_id, kwargs=kwargs))
    with pytest.raises(peft.BundleError) as err:
        peft.from_bundle(bundle)
    assert words in str(err.value) and str(bundle / "adapter.json") in str(err.value)
    assert "cpu" not in builds


@pytest.mark.parametrize("backbone_id,make", [
    ("hf-encoder", lambda: __import__("transformers").BertModel(__import__("transformers").BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128),
        add_pooling_layer=False)),
    ("hf-causal-lm", lambda: __import__("transformers").LlamaForCausalLM(__import__("transformers").LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=128))),
])
def test_transformers_checkpoints_are_counted_from_their_config(tmp_path, backbone_id, make):
    """transformers refuses from_pretrained on the meta device; the dry build reads config.json only."""
    model = make()
    model.save_pretrained(tmp_path / "ckpt")
    for f in (tmp_path / "ckpt").glob("*.safetensors"):
        f.unlink()  # no weights at all: the count must not need them
    n = sum(t.numel() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    assert shared.artifacts.check_backbone(backbone_id, {"checkpoint": str(tmp_path / "ckpt")}, "x.json") == n
    with pytest.raises(peft.BundleError, match=f"has {n:,} parameters, more than the 1,000 allowed"):
        shared.artifacts.check_backbone(backbone_id, {"checkpoint": str(tmp_path / "ckpt")}, "x.json", max_params=1000)
    from transformers import BertModel

    with pytest.raises(OSError):  # outside a dry build from_pretrained is the original (here: no weights)
        BertModel.from_pretrained(tmp_path / "ckpt")


def test_truncated_tensors_refused_before_the_backbone_is_built(bundle, builds):
    f = bundle / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _edit(bundle, lambda m: m.update(sha256=shared.artifacts.sha256_file(f)))  # a crafted, self-consistent json
    with pytest.raises(peft.BundleError, match="truncated") as err:
        peft.from_bundle(bundle)
    assert str(f) in str(err.value) and "the file holds" in str(err.value)
    assert builds == []  # refused before the backbone was even counted


def test_header_declaring_more_than_the_file_holds_is_refused(bundle, builds):
    f = bundle / "adapter.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 20, 1 << 20]  # 4 TiB of float32
    header[name]["data_offsets"][1] = header[name]["data_offsets"][0] + (4 << 40)
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    _edit(bundle, lambda m: m.update(sha256=shared.artifacts.sha256_file(f)))
    with pytest.raises(peft.BundleError, match="unreadable safetensors file") as err:
        peft.from_bundle(bundle)
    assert str(f) in str(err.value) and name in str(err.value)
    assert builds == []


def test_crafted_head_width_is_checked_on_the_meta_device(tiny, bundle, monkeypatch):
    """A 20,000 x 20,000 head (1.6 GB) in adapter.json is refused by its shape, not by allocating it."""
    import shared.heads

    devices = []
    original = shared.heads.HEADS["linear"]

    class Spy(original):
        def __init__(self, *a, **kw):
            devices.append(torch.empty(()).device.type)
            super().__init__(*a, **kw)

    monkeypatch.setitem(shared.heads.HEADS, "linear", Spy)
    _edit(bundle, lambda m: m["head"].update(dim=20_000, num_classes=20_000))
    backbone = tiny.backbone("vit")
    with pytest.raises(peft.BundleError, match=r"head.fc.weight: bundle \(3, 32\) vs model \(20000, 20000\)"):
        peft.load(backbone, bundle)
    assert devices == ["meta"] and getattr(backbone, "peft_state", None) is None


# ------------------------------------------------------------------------------ 9. downloads give up
class CuttingHub(FakeHub):
    """`cut[key] = n`: every transfer of that file (ranged ones too) sends n bytes and closes;
    `trickle[key] = s`: sends one byte every s seconds."""

    def __init__(self):
        super().__init__()
        self.cut, self.trickle = {}, {}

    def handler(self):
        base, hubself = super().handler(), self

        class H(base):
            def _send(self, data, headers, body, key):
                if key not in hubself.cut and key not in hubself.trickle:
                    return super()._send(data, headers, body, key)
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                part = data[start:]
                self.send_response(206 if rng else 200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(part)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                try:
                    if key in hubself.trickle:
                        for i in range(len(part)):
                            self.wfile.write(part[i:i + 1])
                            self.wfile.flush()
                            time.sleep(hubself.trickle[key])
                    else:
                        self.wfile.write(part[:hubself.cut[key]])
                        self.wfile.flush()
                except OSError:  # the client gave up
                    pass
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

        return H


def _serve(fake, tmp_path, monkeypatch):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "suite_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return httpd


@pytest.fixture
def cutting(tmp_path, monkeypatch):
    fake = CuttingHub()
    httpd = _serve(fake, tmp_path, monkeypatch)
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub sleeps 1 s before resuming a broken transfer; the attempts are what counts here."""
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download.time, "sleep", lambda s: None)


def _gets(fake, suffix):
    return [r for r in fake.requests if r[0] == "GET" and r[1].split("?")[0].endswith(suffix)]


def test_url_download_that_is_always_cut_gives_up(tiny, cutting, tmp_path, monkeypatch, capsys, no_backoff):
    _, b = _make_bundle(tiny, tmp_path / "b")
    data = _zip(b)
    cutting.urls["b.zip"] = data
    cutting.cut["/files/b.zip"] = 100
    monkeypatch.setenv("PEFT_SUITE_DOWNLOAD_ATTEMPTS", "2")
    ref = f"{cutting.url}/files/b.zip#sha256={hashlib.sha256(data).hexdigest()}"
    t0 = time.perf_counter()
    assert hub.main(["download", ref]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - t0 < 8
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: {cutting.url}/files/b.zip: no attempts left (PEFT_SUITE_DOWNLOAD_ATTEMPTS allows 2) "
                          f"(2 attempt(s), last error: RemoteProtocolError")
    assert err.endswith("; nothing was kept")
    assert len(_gets(cutting, "/files/b.zip")) == 2  # not 494
    assert not [p for p in (tmp_path / "suite_cache").rglob("*") if p.is_file()]


def test_hub_download_that_is_always_cut_gives_up(tiny, cutting, tmp_path, monkeypatch, no_backoff):
    _, b = _make_bundle(tiny, tmp_path / "b")
    cutting.add_commit("lab/cut", _files(b))
    cutting.cut["lab/cut/adapter.safetensors"] = 100
    monkeypatch.setenv("PEFT_SUITE_DOWNLOAD_ATTEMPTS", "2")
    with pytest.raises(peft.BundleError) as err:
        peft.from_bundle("hf://lab/cut")
    msg = str(err.value)
    assert msg.startswith("hf://lab/cut: download of adapter.safetensors failed: ")
    assert "/lab/cut/resolve/" in msg and "(2 attempt(s), last error: RemoteProtocolError" in msg
    assert len(_gets(cutting, "/adapter.safetensors")) == 2


def test_download_stops_at_the_deadline(tiny, cutting, tmp_path, monkeypatch):
    _, b = _make_bundle(tiny, tmp_path / "b")
    data = _zip(b)
    cutting.urls["slow.zip"] = data
    cutting.trickle["/files/slow.zip"] = 0.02  # ~50 bytes/s: the archive would take minutes
    monkeypatch.setenv("PEFT_SUITE_DOWNLOAD_TIMEOUT", "0.5")
    t0 = time.perf_counter()
    with pytest.raises(peft.BundleError, match=r"deadline of 0.5 s passed \(PEFT_SUITE_DOWNLOAD_TIMEOUT\) \(1 attempt"):
        hub.resolve(f"{cutting.url}/files/slow.zip#sha256={hashlib.sha256(data).hexdigest()}")
    assert time.perf_counter() - t0 < 3
    monkeypatch.setenv("PEFT_SUITE_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(peft.BundleError, match="PEFT_SUITE_DOWNLOAD_TIMEOUT='soon': expected a positive number"):
        hub.resolve(f"{cutting.url}/files/slow.zip#sha256={hashlib.sha256(data).hexdigest()}")


# ------------------------------------------------------------------------------ 10. catalogue + cache
def _repo(tmp_path, monkeypatch, tiny, entries: list[dict]) -> Path:
    """A repository in tmp_path: adapters/x (a real bundle) and domains/audio/adapters.yaml."""
    repo = tmp_path / "repo"
    _make_bundle(tiny, repo / "adapters" / "x")
    d = repo / "domains" / "audio"
    d.mkdir(parents=True)
    (d / "adapters.yaml").write_text(yaml.safe_dump({"adapters": entries}))
    monkeypatch.setenv("PEFT_SUITE_DOMAINS", str(repo / "domains"))
    return repo


def _entry(**kw):
    return {"name": "x", "reference": "adapters/x", "task": "t", "backbone": "b", "metrics": {"test/acc": 0.5},
            "licence": "MIT", **kw}


@pytest.mark.parametrize("reference,words", [
    ("/etc/adapters/x", "is an absolute path"),
    ("~/adapters/x", "is an absolute path"),
    ("../outside/x", "points outside the repository"),
    ("adapters/../../x", "points outside the repository"),
])
def test_catalogue_reference_must_stay_inside_the_repository(tiny, tmp_path, monkeypatch, reference, words):
    repo = _repo(tmp_path, monkeypatch, tiny, [_entry(reference=reference)])
    with pytest.raises(peft.BundleError) as err:
        hub.catalogue()
    msg = str(err.value)
    assert msg.startswith(f"{repo / 'domains' / 'audio' / 'adapters.yaml'}: adapters[0] ('x'): reference")
    assert words in msg and len(msg.splitlines()) == 1


def test_local_catalogue_entry_is_pinned_and_verified_at_download(tiny, tmp_path, monkeypatch, capsys):
    repo = _repo(tmp_path, monkeypatch, tiny, [_entry()])
    bundle = repo / "adapters" / "x"
    sha = shared.artifacts.sha256_file(bundle / "adapter.json")
    catalogue = repo / "domains" / "audio" / "adapters.yaml"
    # no sha256: refused, and the message says what to write
    assert hub.main(["download", "x"]) == 2
    assert f"adapters[0] ('x'): a local reference needs the sha256 of its adapter.json (sha256: {sha})" in \
        capsys.readouterr().err
    catalogue.write_text(yaml.safe_dump({"adapters": [_entry(sha256=sha)]}))
    assert hub.main(["download", "x"]) == 0
    assert Path(capsys.readouterr().out.strip()) == bundle
    # one byte of the tensors flipped: refused at download, not at predict
    f = bundle / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    assert hub.main(["download", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{f} does not match the sha256 in its adapter.json" in err and str(catalogue) in err
    assert f.exists()  # a local bundle is reported, never deleted
    with pytest.raises(peft.BundleError, match="does not match the sha256"):
        peft.read_meta("x")
    # the json itself replaced: the catalogue's sha256 no longer matches
    _edit(bundle, lambda m: m.update(metrics={"test/acc": 0.99}))
    with pytest.raises(peft.BundleError, match="does not match the catalogue's sha256"):
        hub.resolve("x")
    catalogue.write_text(yaml.safe_dump({"adapters": [_entry(sha256="abc")]}))
    with pytest.raises(peft.BundleError, match="'sha256' must be 64 lower-case hex digits"):
        hub.catalogue()


def test_real_local_catalogue_entries_carry_a_matching_sha256():
    local = [e for e in hub.catalogue() if not hub.is_remote(e.reference)]
    assert local
    for e in local:
        assert e.sha256 == shared.artifacts.sha256_file(Path(e.reference) / "adapter.json"), e.name
        assert Path(e.reference).resolve().is_relative_to(REPO)


def test_stale_partial_url_downloads_are_removed(tiny, cutting, tmp_path):
    _, b = _make_bundle(tiny, tmp_path / "b")
    data = _zip(b)
    cutting.urls["b.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    root = tmp_path / "suite_cache" / "urls"
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = root / f".{sha[:16]}.p{dead.pid}.abcd.zip.incomplete"  # what a killed download leaves
    killed.write_bytes(b"x" * 1000)
    unpacking = root / f".{sha[:16]}.p{dead.pid}.efgh.unpack"
    unpacking.mkdir()
    running = root / f".{sha[:16]}.p{os.getppid()}.ijkl.zip.incomplete"  # a live process: left alone
    running.write_bytes(b"y")
    old = root / f".{sha[:16]}.olderformat.zip.incomplete"  # no pid: removed once a day old
    old.write_bytes(b"z")
    os.utime(old, (time.time() - 25 * 3600,) * 2)
    assert hub.resolve(f"{cutting.url}/files/b.zip#sha256={sha}") == root / sha
    assert not killed.exists() and not unpacking.exists() and not old.exists()
    assert running.exists()


def test_stale_partial_hub_downloads_are_removed(tiny, server_like, tmp_path):
    _, b = _make_bundle(tiny, tmp_path / "b")
    server_like.add_commit("lab/x", _files(b))
    blobs = tmp_path / "hf_cache" / "models--lab--x" / "blobs"
    blobs.mkdir(parents=True)
    stale, fresh = blobs / "0123.incomplete", blobs / "4567.incomplete"
    stale.write_bytes(b"s")
    fresh.write_bytes(b"f")  # may be another download in progress: huggingface_hub resumes it
    os.utime(stale, (time.time() - 25 * 3600,) * 2)
    hub.resolve("hf://lab/x")
    assert not stale.exists() and fresh.exists()


@pytest.fixture
def server_like(tmp_path, monkeypatch):
    fake = FakeHub()
    httpd = _serve(fake, tmp_path, monkeypatch)
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_killed_download_leaves_nothing_behind_the_next_one(tiny, cutting, tmp_path):
    """A real `shared.hub download` killed with SIGKILL mid-transfer; the next download cleans up."""
    _, b = _make_bundle(tiny, tmp_path / "b")
    data = _zip(b)
    cutting.urls["b.zip"] = data
    cutting.trickle["/files/b.zip"] = 0.05
    sha = hashlib.sha256(data).hexdigest()
    ref = f"{cutting.url}/files/b.zip#sha256={sha}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "shared.hub", "download", ref], env=env, cwd=REPO)
    root = tmp_path / "suite_cache" / "urls"
    for _ in range(600):
        parts = list(root.glob(".*.incomplete")) if root.exists() else []
        if parts and _gets(cutting, "/files/b.zip"):
            break
        time.sleep(0.1)
    time.sleep(0.5)  # mid-transfer
    proc.kill()
    proc.wait()
    assert parts and parts[0].exists()
    del cutting.trickle["/files/b.zip"]
    assert hub.resolve(ref) == root / sha
    assert not list(root.glob(".*"))


# ------------------------------------------------------------------------------ 11. CLIs, domain, modes
TYPO = "acter-minilm-lorra"


def _typo_message(err: str) -> None:
    assert f"'{TYPO}' is neither a bundle folder" in err and "nor a catalogue name" in err
    assert "did you mean acter-minilm-lora?" in err and "adapter.json" not in err


@pytest.mark.parametrize("cli", ["audio.predict", "medical.predict"])
def test_adapter_typo_in_audio_and_medical_predict(cli, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(cli).main(["--adapter", TYPO, "x.wav"]) == 2
    _typo_message(capsys.readouterr().err)


def test_adapter_typo_in_vision_predict(tmp_path, monkeypatch, capsys):
    from vision import predict

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        predict.main(["--adapter", TYPO, "x.jpg"])
    assert e.value.code == 2
    _typo_message(capsys.readouterr().err)


def test_adapter_typo_in_text_predict(tmp_path, monkeypatch, capsys):
    from shared.cli import friendly
    from text import predict

    monkeypatch.chdir(tmp_path)
    assert friendly(predict.main, ["--adapter", TYPO, "We study the ribosome."]) == 2
    _typo_message(capsys.readouterr().err)


def test_missing_adapter_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(peft.BundleError, match=r"^runs/acter-minilm-lorra/adapter.json: not found \(runs/acter-minilm-lorra "
                                               r"is no folder; did you mean the catalogue's acter-minilm-lora\?\)$"):
        hub.resolve_adapter("runs/acter-minilm-lorra")
    assert hub.resolve_adapter("acter-minilm-lora") == REPO / "adapters" / "acter-minilm-lora"


def test_every_bundle_records_its_domain(tiny, tmp_path):
    from shared.module import ClassificationModule

    def save(name, model, **kw):
        return peft.read_meta(peft.save(model, tmp_path / name, **kw))["domain"]

    ast = peft.attach(tiny.backbone("ast"), [peft.BitFit()])
    assert save("ast", peft.Classifier(ast, LinearHead(32, 2, pool="mean"))) == "audio"
    assert save("vit", peft.attach(tiny.backbone("vit"), [peft.BitFit()])) == "medical"
    assert save("birds", peft.attach(tiny.backbone("vit"), [peft.BitFit()]), extra={"domain": "bioacoustic"}) == "bioacoustic"
    # a backbone built outside the registry: the domain of its anatomy's family
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                             depths=(1, 1), num_heads=(2, 4), window_size=4, num_classes=0)
    assert save("swin", peft.attach(swin, [peft.BitFit()], backbone_id="my-swin")) == "vision"

    class Data:  # what a domain's data module looks like to the module: its package
        pass

    Data.__module__ = "audio.datasets"
    m = ClassificationModule(backbone="tiny-vit", num_classes=2, labels=["a", "b"], methods=[{"name": "bitfit"}])
    assert m.bundle_domain() is None  # not attached to a Trainer: peft.save takes the backbone's
    assert peft.read_meta(m.save_bundle(tmp_path / "m1"))["domain"] == "medical"
    m._trainer = type("T", (), {"datamodule": Data()})()
    assert peft.read_meta(m.save_bundle(tmp_path / "m2"))["domain"] == "audio"
    Data.__module__ = "audio.birds.birdset"
    assert m.bundle_domain() == "bioacoustic"


def test_unknown_domain_must_be_said(tmp_path):
    class Net(torch.nn.Module):  # a backbone no anatomy knows cannot be attached; fake the state
        pass

    from shared.peft.base import PeftState

    net = Net()
    net.peft_state = PeftState(fingerprint="", backbone_id="my-net")
    with pytest.raises(peft.BundleError, match="the bundle's domain is unknown .* pass domain="):
        peft.save(net, tmp_path / "n")
    assert not (tmp_path / "n").exists()
    assert peft.read_meta(peft.save(net, tmp_path / "n", domain="audio"))["domain"] == "audio"


def test_old_bundle_without_domain_is_named_where_a_domain_is_needed(tiny, bundle, tmp_path):
    from vision.train import load_bundle

    _edit(bundle, lambda m: m.pop("domain"))
    with pytest.raises(peft.BundleError, match="not a vision bundle: it records no domain .*python -m vision.train"):
        load_bundle(bundle)
    assert peft.from_bundle(bundle).labels == LABELS  # where no domain is needed it still loads
    _edit(bundle, lambda m: m.update(domain="audio"))
    with pytest.raises(peft.BundleError, match=r"not a vision bundle \(its domain is 'audio'\)"):
        load_bundle(bundle)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_bundle_files_follow_the_umask(tiny, tmp_path, umask, mode):
    from medical.segmentation import LinearDecoder, save_segmenter

    old = os.umask(umask)
    try:
        _, b = _make_bundle(tiny, tmp_path / "b")
        backbone = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, targets=("qkv",))])
        seg = save_segmenter(backbone, LinearDecoder(32, 2), tmp_path / "seg", labels=["bg", "fg"])
    finally:
        os.umask(old)
    for f in [b / "adapter.json", b / "adapter.safetensors", seg / "adapter.safetensors", seg / "decoder.safetensors"]:
        assert oct(f.stat().st_mode & 0o777) == oct(mode), f
    assert oct(b.stat().st_mode & 0o777) == oct(0o777 & ~umask)
