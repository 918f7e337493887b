"""Adapter references without the internet: a local server plays the Hub's file endpoints
(`HF_ENDPOINT` points at it) and plain https-style URLs; `huggingface_hub` does the downloading."""
from __future__ import annotations

import copy
import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from shared import hub, peft
from shared.heads import LinearHead

LABELS = ["dog", "rain", "siren"]


# ------------------------------------------------------------------------------------ server
class FakeHub:
    """Repos: {repo_id: {"private": bool, "refs": {name: commit}, "commits": {commit: {path: bytes}}}}.

    `drop_once[path] = n` makes the next full GET of `path` send n bytes then close the connection.
    """

    def __init__(self):
        self.repos, self.urls, self.drop_once, self.requests = {}, {}, {}, []
        self.token = "hf_secret"

    def add_commit(self, repo, files: dict[str, bytes], ref="main", private=False) -> str:
        r = self.repos.setdefault(repo, {"private": private, "refs": {}, "commits": {}})
        commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                              + str(len(r["commits"])).encode()).hexdigest()
        r["commits"][commit] = dict(files)
        r["refs"][ref] = commit
        return commit

    def handler(self):
        hubself = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _error(self, code, error_code, msg=""):
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", msg or error_code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, data: bytes, headers: dict, body: bool, key: str):
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
                n = hubself.drop_once.pop(key, None) if not rng else None
                if n is not None:  # an interrupted transfer: part of the body, then the connection drops
                    self.wfile.write(part[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(part)

            def _handle(self, body: bool):
                hubself.requests.append((self.command, self.path, self.headers.get("Range"),
                                         self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                if path.startswith("/files/"):
                    name = path[len("/files/"):]
                    if name not in hubself.urls:
                        return self._error(404, "NotFound")
                    return self._send(hubself.urls[name], {}, body, path)
                parts = path.strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "NotFound")
                repo_id, rev, fname = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = hubself.repos.get(repo_id)
                if repo is None or (repo["private"] and self.headers.get("Authorization") != f"Bearer {hubself.token}"):
                    return self._error(401 if repo else 404, "RepoNotFound", "Repository not found")
                commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
                if commit is None:
                    return self._error(404, "RevisionNotFound")
                files = repo["commits"][commit]
                if fname not in files:
                    return self._error(404, "EntryNotFound")
                data = files[fname]
                etag = hashlib.sha256(data).hexdigest()
                self._send(data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, body, f"{repo_id}/{fname}")

            def do_HEAD(self):
                self._handle(False)

            def do_GET(self):
                self._handle(True)

        return H


@pytest.fixture
def server(tmp_path, monkeypatch):
    fake = FakeHub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "suite_cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield fake
    httpd.shutdown()
    httpd.server_close()


# ------------------------------------------------------------------------------------ bundles
def _make_bundle(tiny, path: Path, lr_seed: int = 3, metrics=None) -> tuple[torch.nn.Module, Path]:
    pristine = tiny.backbone("vit")
    model = peft.Classifier(peft.attach(copy.deepcopy(pristine), [peft.LoRA(r=4, alpha=8, targets=("qkv",))]),
                            LinearHead(32, 3, pool="cls"), labels=LABELS)
    with torch.no_grad():
        g = torch.Generator().manual_seed(lr_seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval(), peft.save(model, path, metrics=metrics or {"val/acc": 0.5})


def _files(bundle: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + f.name: f.read_bytes() for f in bundle.iterdir()}


def _zip(bundle: Path, members: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in (members or {f"adapter/{f.name}": f.read_bytes() for f in bundle.iterdir()}).items():
            z.writestr(name, data)
    return buf.getvalue()


def _cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()) if root.exists() else []


# ------------------------------------------------------------------------------------ tests
def test_hub_download_then_offline_cache_hit(tiny, server, tmp_path, monkeypatch):
    model, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/vit-lora", _files(bundle))
    x = tiny.input("vit")
    loaded = peft.from_bundle("hf://lab/vit-lora").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.labels == LABELS
    gets = [r for r in server.requests if r[0] == "GET"]
    assert sorted(p.rsplit("/", 1)[1] for _, p, _, _ in gets) == ["adapter.json", "adapter.safetensors"]

    # Offline: served from huggingface_hub's cache without a single request.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(server.requests)
    again = peft.load(tiny.backbone("vit"), "hf://lab/vit-lora").eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert len(server.requests) == n
    # A reference wrapped in Path (as argparse type=Path does) still resolves.
    assert hub.resolve(Path("hf://lab/vit-lora")) == hub.resolve("hf://lab/vit-lora")


def test_hub_offline_without_cache_is_refused(tiny, server, tmp_path, monkeypatch):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/vit-lora", _files(bundle))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(peft.BundleError, match="not in the local cache and offline"):
        peft.read_meta("hf://lab/vit-lora")
    assert server.requests == []


@pytest.fixture
def small_chunks(monkeypatch):
    """huggingface_hub writes 10 MB chunks; with 1 KiB ones our small files behave like big ones."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    return 1024


def test_hub_resume_after_interrupted_transfer(tiny, server, tmp_path, small_chunks):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/vit-lora", _files(bundle))
    assert (bundle / "adapter.safetensors").stat().st_size > 3 * small_chunks
    server.drop_once["lab/vit-lora/adapter.safetensors"] = 2 * small_chunks
    folder = hub.resolve("hf://lab/vit-lora")
    assert (folder / "adapter.safetensors").read_bytes() == (bundle / "adapter.safetensors").read_bytes()
    ranged = [r for r in server.requests if r[0] == "GET" and r[2]]
    assert [r[2] for r in ranged] == [f"bytes={2 * small_chunks}-"]  # the retry asked only for the rest
    assert not [p for p in _cache_files(tmp_path / "hf_cache") if p.name.endswith(".incomplete")]


def test_hub_tampered_file_refused_and_evicted(tiny, server, tmp_path):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    files = _files(bundle)
    data = bytearray(files["adapter.safetensors"])
    data[-5] ^= 0xFF  # same size, one byte changed after adapter.json recorded its sha256
    files["adapter.safetensors"] = bytes(data)
    server.add_commit("lab/tampered", files)
    with pytest.raises(peft.BundleError, match="does not match the sha256") as err:
        peft.from_bundle("hf://lab/tampered")
    assert "hf://lab/tampered" in str(err.value) and "removed from the cache" in str(err.value)
    cached = _cache_files(tmp_path / "hf_cache")
    assert all(p.read_bytes() != bytes(data) for p in cached if p.exists())  # the bad blob is gone
    assert not [p for p in cached if p.name == "adapter.safetensors"]


def test_hub_truncated_file_refused(tiny, server, tmp_path):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    files = _files(bundle)
    files["adapter.safetensors"] = files["adapter.safetensors"][:100]
    server.add_commit("lab/truncated", files)
    with pytest.raises(peft.BundleError, match="adapter.safetensors does not match the sha256"):
        hub.resolve("hf://lab/truncated")
    assert not [p for p in _cache_files(tmp_path / "hf_cache") if p.name == "adapter.safetensors"]


def test_hub_revision_pinning_and_subfolder(tiny, server, tmp_path):
    _, old = _make_bundle(tiny, tmp_path / "old", lr_seed=1, metrics={"val/acc": 0.25})
    _, new = _make_bundle(tiny, tmp_path / "new", lr_seed=2, metrics={"val/acc": 0.75})
    c1 = server.add_commit("lab/multi", _files(old, "medical/lora/"))
    server.add_commit("lab/multi", _files(old, "medical/lora/"), ref="v1")
    c2 = server.add_commit("lab/multi", _files(new, "medical/lora/"))
    assert c1 != c2
    assert peft.read_meta("hf://lab/multi/medical/lora")["metrics"] == {"val/acc": 0.75}
    assert peft.read_meta(f"hf://lab/multi/medical/lora@{c1}")["metrics"] == {"val/acc": 0.25}
    assert peft.read_meta("hf://lab/multi/medical/lora@v1")["metrics"] == {"val/acc": 0.25}
    assert hub.resolve(f"hf://lab/multi/medical/lora@{c1}").parent.parent.name == c1
    with pytest.raises(peft.BundleError, match="revision 'nope' not found"):
        hub.resolve("hf://lab/multi/medical/lora@nope")
    with pytest.raises(peft.BundleError, match="no adapter.json"):
        hub.resolve("hf://lab/multi/audio")


def test_hub_private_repo_needs_token(tiny, server, tmp_path, monkeypatch):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/private", _files(bundle), private=True)
    with pytest.raises(peft.BundleError, match="not found, or private and no valid token") as err:
        hub.resolve("hf://lab/private")
    assert "HF_TOKEN" in str(err.value)
    assert not _cache_files(tmp_path / "hf_cache" / "models--lab--private" / "snapshots")
    monkeypatch.setenv("HF_TOKEN", server.token)  # what `hf auth login` provides
    assert peft.read_meta("hf://lab/private")["labels"] == LABELS
    assert server.requests[-1][3] == f"Bearer {server.token}"


def test_url_download_cache_and_offline(tiny, server, tmp_path, monkeypatch, small_chunks):
    model, bundle = _make_bundle(tiny, tmp_path / "b")
    data = _zip(bundle)
    server.urls["b.zip"] = data
    sha = hashlib.sha256(data).hexdigest()
    ref = f"{server.url}/files/b.zip#sha256={sha}"
    server.drop_once["/files/b.zip"] = 3 * small_chunks  # interrupted, resumed
    loaded = peft.load(tiny.backbone("vit"), ref).eval()
    x = tiny.input("vit")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [r[2] for r in server.requests if r[2]] == [f"bytes={3 * small_chunks}-"]
    cache = tmp_path / "suite_cache" / "urls"
    assert sorted(p.name for p in cache.iterdir()) == [sha]
    assert sorted(p.name for p in (cache / sha).iterdir()) == ["adapter.json", "adapter.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(server.requests)
    assert hub.resolve(ref) == cache / sha
    assert len(server.requests) == n


def test_url_sha_mismatch_and_truncation_refused(tiny, server, tmp_path):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    data = _zip(bundle)
    server.urls["b.zip"] = data
    good = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(peft.BundleError, match="sha256 mismatch") as err:
        hub.resolve(f"{server.url}/files/b.zip#sha256={wrong}")
    assert "nothing was kept" in str(err.value)
    server.urls["b.zip"] = data[: len(data) // 2]  # the server now has a truncated archive
    with pytest.raises(peft.BundleError, match="sha256 mismatch"):
        hub.resolve(f"{server.url}/files/b.zip#sha256={good}")
    assert _cache_files(tmp_path / "suite_cache") == []  # no partial, no half-unpacked folder
    with pytest.raises(peft.BundleError, match="needs a pinned checksum"):
        hub.resolve(f"{server.url}/files/b.zip")
    with pytest.raises(peft.BundleError, match="download failed"):
        hub.resolve(f"{server.url}/files/missing.zip#sha256={good}")


def test_url_archive_with_unsafe_member_refused(tiny, server, tmp_path):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    data = _zip(bundle, {"adapter.json": (bundle / "adapter.json").read_bytes(), "../evil.py": b"import os"})
    server.urls["evil.zip"] = data
    with pytest.raises(peft.BundleError, match="not a plain file"):
        hub.resolve(f"{server.url}/files/evil.zip#sha256={hashlib.sha256(data).hexdigest()}")
    assert not (tmp_path / "suite_cache" / "evil.py").exists() and not (tmp_path / "evil.py").exists()
    assert _cache_files(tmp_path / "suite_cache") == []


def test_init_bundle_accepts_hub_reference(tiny, server, tmp_path):
    from shared.module import ClassificationModule

    model, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/vit-lora", _files(bundle))
    module = ClassificationModule(backbone="tiny-vit", num_classes=3, labels=LABELS,
                                  init_bundle="hf://lab/vit-lora").eval()
    x = tiny.input("vit")
    with torch.no_grad():
        assert torch.equal(module.model(x), model(x))


def test_download_cli_with_reference(tiny, server, tmp_path, capsys):
    _, bundle = _make_bundle(tiny, tmp_path / "b")
    server.add_commit("lab/vit-lora", _files(bundle))
    assert hub.main(["download", "hf://lab/vit-lora"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert json.loads((folder / "adapter.json").read_text())["labels"] == LABELS
    assert hub.main(["download", "no-such-adapter"]) == 2
    assert "neither a bundle folder" in capsys.readouterr().err


def test_segmentation_bundle_from_hub_fetches_and_verifies_its_decoder(tiny, server, tmp_path):
    from medical.segmentation import LinearDecoder, load_segmenter, save_segmenter

    backbone = peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, targets=("qkv",))])
    decoder = LinearDecoder(32, 2)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.5)
    bundle = save_segmenter(backbone, decoder, tmp_path / "seg", labels=["background", "lung"])
    files = _files(bundle)
    assert "decoder.safetensors" in files
    server.add_commit("lab/seg", files)
    _, dec, meta = load_segmenter("hf://lab/seg")
    assert meta["task"] == "segmentation"
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), decoder.state_dict().values()))
    bad = dict(files)
    bad["decoder.safetensors"] = files["decoder.safetensors"][:-8] + b"\0" * 8
    server.add_commit("lab/seg-bad", bad)
    with pytest.raises(peft.BundleError, match="decoder.safetensors does not match the sha256"):
        load_segmenter("hf://lab/seg-bad")
