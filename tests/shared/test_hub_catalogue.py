"""The per-domain adapter catalogue (`domains/*/adapters.yaml`), `python -m shared.hub list / download`,
and `push` (model card by dry run; the upload calls against a recording stand-in for HfApi)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from shared import hub, peft
from shared.artifacts import read_checked_tensors
from shared.heads import LinearHead

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- the real catalogue
ENTRIES = hub.catalogue()


def test_catalogue_is_not_empty_and_names_are_unique():
    assert ENTRIES, "domains/*/adapters.yaml lists no adapter"
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_every_catalogue_entry_is_a_real_verified_bundle(entry):
    folder = hub.resolve(entry.name)  # a missing or damaged adapter fails here, never skips
    assert folder == hub.resolve(entry.reference)
    meta = peft.read_meta(folder)
    for name, sha in hub._bundle_files(folder, meta).items():
        read_checked_tensors(folder / name, sha)
    for k, v in meta["metrics"].items():  # what training measured is what the catalogue says
        if k in entry.metrics:
            assert math.isclose(entry.metrics[k], v, abs_tol=5e-5), (k, entry.metrics[k], v)
    card = folder / "README.md"
    assert card.is_file() and entry.licence.split()[0] in card.read_text()
    assert meta["labels"] and meta["head"]["num_classes"] == len(meta["labels"])


def test_list_prints_the_catalogue(capsys):
    assert hub.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "domain", "task"]
    for e in ENTRIES:
        assert any(line.startswith(e.name + " ") for line in out)
    assert hub.main(["list", "--domain", "audio"]) == 0
    assert not any(line.startswith(e.name + " ") for e in ENTRIES if e.domain != "audio"
                   for line in capsys.readouterr().out.splitlines())
    assert hub.main(["list", "--domain", "nope"]) == 2
    assert "no catalogue for domain 'nope'" in capsys.readouterr().err


def test_download_by_catalogue_name(capsys):
    e = ENTRIES[0]
    assert hub.main(["download", e.name]) == 0
    assert Path(capsys.readouterr().out.strip()) == Path(e.reference)


# ---------------------------------------------------------------------------- validation
def _catalogue(tmp_path, monkeypatch, text: str) -> Path:
    d = tmp_path / "domains" / "audio"
    d.mkdir(parents=True)
    (d / "adapters.yaml").write_text(text)
    monkeypatch.setenv("PEFT_SUITE_DOMAINS", str(tmp_path / "domains"))
    return d / "adapters.yaml"


GOOD = {"name": "x", "reference": "adapters/x", "task": "t", "backbone": "b", "metrics": {"test/acc": 0.5},
        "licence": "MIT"}


@pytest.mark.parametrize("doc,words", [
    ("adapters: [\n", "not valid YAML"),
    ("something: 1", "top-level 'adapters:' list"),
    (yaml.safe_dump({"adapters": [{k: v for k, v in GOOD.items() if k != "licence"}]}), "adapters[0]: missing field(s) ['licence']"),
    (yaml.safe_dump({"adapters": [{**GOOD, "metrics": {"acc": "high"}}]}), "'metrics' must map metric names to numbers"),
    (yaml.safe_dump({"adapters": [{**GOOD, "url": "x"}]}), "unknown field(s) ['url']"),
    (yaml.safe_dump({"adapters": [GOOD, GOOD]}), "adapters[1]: name 'x' is already used"),
])
def test_bad_catalogue_names_file_and_field(tmp_path, monkeypatch, doc, words):
    path = _catalogue(tmp_path, monkeypatch, doc)
    with pytest.raises(peft.BundleError) as err:
        hub.catalogue()
    assert str(path) in str(err.value) and words in str(err.value)


def test_entry_pointing_nowhere_fails(tmp_path, monkeypatch):
    _catalogue(tmp_path, monkeypatch, yaml.safe_dump({"adapters": [GOOD]}))
    with pytest.raises(peft.BundleError, match="adapters/x/adapter.json: not found"):
        peft.read_meta("x")


# ---------------------------------------------------------------------------- push
@pytest.fixture
def bundle(tiny, tmp_path):
    model = peft.Classifier(peft.attach(tiny.backbone("vit"), [peft.LoRA(r=2, alpha=4, targets=("qkv",))]),
                            LinearHead(32, 2, pool="cls"), labels=["normal", "pneumonia"])
    return peft.save(model, tmp_path / "b", metrics={"test/acc": 0.875})


def test_push_dry_run_prints_the_card(bundle, capsys):
    assert hub.main(["push", str(bundle), "me/vit-lora", "--dry-run", "--licence", "MIT",
                     "--data", "balanced PneumoniaMNIST subset, test split (468 images)"]) == 0
    card = capsys.readouterr().out
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft-suite" and front["license"] == "mit" and "lora" in front["tags"]
    meta = peft.read_meta(bundle)
    lora = sum(math.prod(t["shape"]) for k, t in meta["tensors"].items() if k.startswith("backbone."))
    for words in ["**Labels (2):** normal, pneumonia", "registered id `tiny-vit`", meta["backbone"]["fingerprint"],
                  "lora (r=2, alpha=4", f"lora {lora:,}", "head 66", "**Licence:** MIT",
                  "Measured on: balanced PneumoniaMNIST subset, test split (468 images)", "| test/acc | 0.8750 |",
                  'peft.from_bundle("hf://me/vit-lora")', "python -m medical.predict --adapter hf://me/vit-lora"]:
        assert words in card, words


def test_push_uploads_bundle_and_card(bundle, monkeypatch):
    import huggingface_hub

    calls = []

    class Api:
        def __init__(self, endpoint=None, token=None):
            calls.append(("init", endpoint, token))

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create_repo", repo_id, private))

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls.append(("create_branch", repo_id, branch))

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=""):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            calls.append(("upload_folder", repo_id, revision, sorted(files)))
            assert files["adapter.safetensors"] == (bundle / "adapter.safetensors").read_bytes()
            assert files["README.md"].startswith(b"---\n")
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    url = hub.push(bundle, "me/vit-lora", private=True, revision="v1")
    assert url == "https://hub/me/vit-lora/commit/1"
    assert calls == [("init", "http://127.0.0.1:9", None), ("create_repo", "me/vit-lora", True),
                     ("create_branch", "me/vit-lora", "v1"),
                     ("upload_folder", "me/vit-lora", "v1", ["README.md", "adapter.json", "adapter.safetensors"])]


def test_push_refuses_a_damaged_bundle_or_bad_repo_id(bundle):
    with pytest.raises(peft.BundleError, match="owner/name"):
        hub.push(bundle, "no-owner", dry_run=True)
    data = bytearray((bundle / "adapter.safetensors").read_bytes())
    data[-3] ^= 1
    (bundle / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(peft.BundleError, match="checksum mismatch"):
        hub.push(bundle, "me/x", dry_run=True)
