"""The documentation site builds cleanly and stays connected.

- `mkdocs build --strict` (mkdocs.yml: broken links and anchors, pages left out of the navigation
  and mkdocstrings references that no longer resolve are warnings, and strict turns them into
  failures);
- every Markdown page under docs/ is in the navigation, checked here explicitly (whether mkdocs
  warns about it depends on its version and settings);
- every link from README.md into docs/ names a page that exists, and its #anchor a heading of the
  built page.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def nav_pages(nav) -> list[str]:
    """The page paths of a mkdocs `nav` (nested lists of `{title: path}` / `{title: [...]}` / path)."""
    out: list[str] = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(nav_pages(value) if isinstance(value, list) else [value])
        else:
            raise TypeError(f"mkdocs.yml: unexpected nav entry {item!r}")
    return [p for p in out if not re.match(r"^[a-z]+://", p)]


def missing_from_nav(config: dict, docs: Path) -> tuple[list[str], list[str]]:
    """(pages on disk not in the nav, nav entries with no page on disk)."""
    in_nav = nav_pages(config.get("nav") or [])
    on_disk = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    return sorted(set(on_disk) - set(in_nav)), sorted(set(in_nav) - set(on_disk))


def readme_doc_links(text: str) -> list[tuple[str, str]]:
    """(page path under docs/, anchor or "") of every Markdown link from the README into docs/."""
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith("docs/"):
            page, _, anchor = target.partition("#")
            links.append((page.removeprefix("docs/"), anchor))
    return links


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k == "id" and v)


def html_ids(path: Path) -> set[str]:
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.ids


def built_page(site: Path, page: str) -> Path:
    """Where mkdocs (use_directory_urls) writes docs/<page>: index.md -> index.html, a.md -> a/index.html."""
    stem = page.removesuffix(".md")
    return site / ("index.html" if stem == "index" else (stem.removesuffix("/index") + "/index.html"))


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    not_in_nav, no_page = missing_from_nav(config, DOCS)
    assert not_in_nav == [], f"docs pages missing from the nav in mkdocs.yml: {not_in_nav}"
    assert no_page == [], f"mkdocs.yml nav entries without a page under docs/: {no_page}"


def test_the_nav_check_catches_a_page_left_out(tmp_path):
    (tmp_path / "api").mkdir()
    for page in ("index.md", "a.md", "api/b.md", "orphan.md"):
        (tmp_path / page).write_text("# x\n")
    config = {"nav": [{"Home": "index.md"}, "a.md", {"API": [{"b": "api/b.md"}, {"gone": "api/gone.md"}]},
                      {"Site": "https://example.org/"}]}
    assert missing_from_nav(config, tmp_path) == (["orphan.md"], ["api/gone.md"])


def test_readme_links_into_docs_name_existing_pages():
    links = readme_doc_links(README.read_text())
    assert len(links) >= 10, "README should link to the manuals in docs/"
    missing = sorted({page for page, _ in links if not (DOCS / page).is_file()})
    assert missing == [], f"README links to docs pages that do not exist: {missing}"


def test_readme_link_parser():
    text = "see [a](docs/a.md), [b](docs/api/b.md#x-y) and [c](https://x.org/docs/c.md) [d](shared/x.py)"
    assert readme_doc_links(text) == [("a.md", ""), ("api/b.md", "x-y")]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for mod in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        if not _has_module(mod):
            pytest.skip(f"{mod} is not installed (it is in the dev extra: pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if "WARNING" in line or "ERROR" in line]
    assert r.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [r.stderr[-3000:]])
    return out


def _has_module(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_mkdocs_build_strict(site):
    assert (site / "index.html").is_file()
    # the API pages were generated from the docstrings (a `:::` that rendered nothing would be empty)
    assert "shared.peft.attach" in html_ids(site / "api" / "peft" / "index.html")
    assert "medical.data.MedMNISTDataModule" in html_ids(site / "api" / "medical" / "index.html")


def test_readme_anchors_into_docs_resolve(site):
    bad = []
    for page, anchor in readme_doc_links(README.read_text()):
        if anchor and anchor not in html_ids(built_page(site, page)):
            bad.append(f"docs/{page}#{anchor}")
    assert bad == [], f"README links to anchors that no heading of the built page has: {sorted(set(bad))}"


def readme_test_command(text: str) -> list[str]:
    """The steps of the bash block of the README's `## Tests` section, split at `&&`."""
    section = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [step.strip() for step in block.replace("\\\n", " ").split("&&") if step.strip()]


def ci_steps(script: str) -> list[str]:
    """The commands of .ci/run, with `python -m pip` -> `pip`, quiet flags dropped and the shell setup
    (`set`, `cd`, the pip self-upgrade) left out."""
    out = []
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")) or "--upgrade pip" in line:
            continue
        line = re.sub(r"^python -m pip ", "pip ", line)
        out.append(re.sub(r"\s+-q\b", "", line))
    return out


def test_ci_runs_exactly_the_readme_test_command():
    assert ci_steps((ROOT / ".ci" / "run").read_text()) == readme_test_command(README.read_text())


def test_the_ci_comparison_sees_a_difference():
    readme = "x\n## Tests\n\n```bash\npython3 -m venv .venv && . .venv/bin/activate && python -m pytest\n```\n"
    ci = "#!/usr/bin/env bash\nset -e\ncd x\npython3 -m venv .venv\n. .venv/bin/activate\npython -m pytest -x\n"
    assert ci_steps(ci) != readme_test_command(readme)
    assert ci_steps(ci.replace(" -x", "")) == readme_test_command(readme)
