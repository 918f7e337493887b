"""The layout rules of DESIGN.md that code can check: no domain imports another domain, and moved
module paths fail with one line naming the new path."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("audio", "medical", "vision", "text")


def imported_packages(path: Path) -> set[str]:
    """Top-level packages that `path` imports (absolute imports, at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def cross_domain_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for domain in DOMAINS:
        for f in sorted((root / domain).rglob("*.py")):
            for pkg in sorted(imported_packages(f) & (set(DOMAINS) - {domain})):
                bad.append(f"{f.relative_to(root)} imports {pkg}")
    for f in sorted((root / "shared").rglob("*.py")):
        # the core never imports a domain either (the backbone registry names them as strings)
        for pkg in sorted(imported_packages(f) & set(DOMAINS)):
            bad.append(f"{f.relative_to(root)} imports {pkg}")
    return bad


def test_no_domain_imports_another_domain():
    assert cross_domain_imports() == []


def test_the_rule_catches_an_import_inside_a_function(tmp_path):
    for d in (*DOMAINS, "shared"):
        (tmp_path / d).mkdir()
    (tmp_path / "vision" / "x.py").write_text("def f():\n    from audio.backbone import thing\n    return thing\n")
    (tmp_path / "shared" / "y.py").write_text("import medical.io\n")
    assert cross_domain_imports(tmp_path) == ["vision/x.py imports audio", "shared/y.py imports medical"]


@pytest.mark.parametrize("old, new", [("audio.bird_synthetic", "audio.birds.synthetic"),
                                      ("audio.birdmae", "audio.birds.birdmae"),
                                      ("medical.datasets", "medical.data")])
def test_a_moved_module_fails_in_one_line_naming_the_new_path(old, new):
    r = subprocess.run([sys.executable, "-c", f"import {old}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("shared.moved.ModuleMoved") and f"{old} moved to {new}" in last


def test_an_old_recipe_class_path_fails_naming_the_new_one(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text((ROOT / "domains/bioacoustic/demo.yaml").read_text()
                      .replace("audio.birds.synthetic", "audio.bird_synthetic"))
    r = subprocess.run([sys.executable, "-m", "audio.probe", "--config", str(recipe)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "audio.bird_synthetic moved to audio.birds.synthetic" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
