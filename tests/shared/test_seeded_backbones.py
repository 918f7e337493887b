"""Seeded backbones build the same weights whatever the process imported before (issue 17, item 20),
and a fingerprint mismatch says what differs between the bundle's record and the rebuilt backbone."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared import backbones, peft
from shared.backbones import BACKBONES, describe_mismatch, register_backbone

REPO = Path(__file__).resolve().parents[2]
# A module whose import draws from torch's generator and reseeds numpy's, like a library that builds
# a random table or calls seed functions at import time.
HUNGRY = "import numpy, torch\n_table = torch.rand(5)\nnumpy.random.seed(123)\n"


@pytest.fixture
def hungry_module(tmp_path, monkeypatch):
    name = f"rng_hungry_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(HUNGRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def registered():
    names = []

    def reg(name, fn):
        register_backbone(name, seeded=True)(fn)
        names.append(name)
        return name
    yield reg
    for n in names:
        BACKBONES.pop(n, None)


def test_an_import_inside_the_seeded_builder_does_not_change_the_weights(hungry_module, registered):
    """The builder imports a module on its first call, after the seed and before its parameter init.
    Before the fix the first build's weights came from a generator that import had moved on."""
    def build(width: int = 8):
        __import__(hungry_module)  # lazily imported: only the first build in a process pays it
        return nn.Sequential(nn.Linear(width, width), nn.Linear(width, 2))

    name = registered("test-lazy-import", build)
    first = peft.fingerprint(backbones.create(name))
    assert hungry_module in sys.modules
    second = peft.fingerprint(backbones.create(name))
    assert first == second
    with backbones.seeded_rng(0):  # what the constructor alone draws from a freshly seeded generator
        expected = peft.fingerprint(build())
    assert first == expected


def test_seeded_build_seeds_numpy_and_random_and_restores_the_callers_state(registered):
    def build():
        m = nn.Linear(3, 3)
        with torch.no_grad():
            m.bias.copy_(torch.from_numpy(np.random.rand(3)).float() + random.random())
        return m

    name = registered("test-numpy-init", build)
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    a = backbones.create(name)
    after = (np.random.rand(), random.random(), float(torch.rand(())))
    np.random.seed(99), random.seed(99), torch.manual_seed(99)  # another caller state: same weights
    b = backbones.create(name)
    assert torch.equal(a.bias, b.bias) and torch.equal(a.weight, b.weight)
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    assert (np.random.rand(), random.random(), float(torch.rand(()))) == after  # the build drew nothing of ours


def test_create_records_seed_versions_and_cpu_kernels():
    model = backbones.create("tiny-vit", seed=3, embed_dim=16, depth=1, num_heads=2)
    build = model.registry_source["build"]
    from importlib.metadata import version

    assert build["seed"] == 3 and build["versions"]["torch"] == version("torch")
    assert backbones.build_record()["seed"] is None  # what an unseeded loader records
    assert build["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert build["default_dtype"] == "float32"


def test_mismatch_message_names_what_differs(tmp_path):
    kw = {"embed_dim": 16, "depth": 1, "num_heads": 2}
    model = peft.Classifier(peft.attach(backbones.create("tiny-vit", **kw), []),
                            __import__("shared.heads", fromlist=["LinearHead"]).LinearHead(16, 2, pool="cls"))
    path = peft.save(model, tmp_path / "b", labels=["a", "b"], domain="medical")
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["backbone"]["build"]["seed"] == 0 and "torch" in meta["backbone"]["build"]["versions"]

    with pytest.raises(peft.BundleError) as e:
        peft.load(backbones.create("tiny-vit", seed=1, **kw), path)
    assert "recorded vs now: seed 0 vs 1 (pass" in str(e.value) and "kwargs" not in str(e.value).split("recorded")[1]

    # the same build, recorded under other library versions / CPU kernels (the bundle came from elsewhere)
    meta["backbone"]["build"]["versions"]["timm"] = "0.0.1"
    here = torch.backends.cpu.get_cpu_capability()
    elsewhere = "AVX2" if here != "AVX2" else "AVX512"  # a capability other than this machine's
    meta["backbone"]["build"]["cpu_capability"] = elsewhere
    meta["backbone"]["fingerprint"] = "0" * 32
    rebuilt = backbones.create("tiny-vit", **kw)
    msg = describe_mismatch(meta["backbone"], rebuilt)
    assert msg.startswith("recorded vs now: ") and "timm 0.0.1 vs " in msg
    assert f"CPU kernels {elsewhere} vs {here}" in msg and "seed" not in msg
    other = {**meta["backbone"], "id": "tiny-swin", "kwargs": {**kw, "depth": 2}}
    assert describe_mismatch(other, rebuilt).startswith(
        "recorded vs now: backbone id 'tiny-swin' vs 'tiny-vit'; kwargs {'embed_dim': 16, 'depth': 2, 'num_heads': 2} "
        "vs {'embed_dim': 16, 'depth': 1, 'num_heads': 2}; timm 0.0.1 vs ")
    meta["backbone"].pop("build")
    assert "records no seed or library versions" in describe_mismatch(meta["backbone"], rebuilt)
    assert "not built by shared.backbones.create" in describe_mismatch(meta["backbone"], nn.Linear(2, 2))


FRESH = textwrap.dedent("""
    import importlib, sys
    for m in sys.argv[1].split(","):
        if m:
            importlib.import_module(m)
    from shared.backbones import create, register_backbone
    from shared.peft import fingerprint
    from torch import nn

    @register_backbone("test-lazy-import", seeded=True)
    def build():
        import rng_hungry_fresh
        return nn.Linear(8, 8)

    out = [fingerprint(create("tiny-bird-mae", embed_dim=16, depth=1, num_heads=2)),
           fingerprint(create("tiny-vit", embed_dim=16, depth=1, num_heads=2)),
           fingerprint(create("test-lazy-import")), fingerprint(create("test-lazy-import"))]
    print(" ".join(out))
""")


@pytest.mark.slow
def test_fresh_interpreters_with_and_without_heavy_imports_build_the_same_weights(tmp_path):
    """Fresh subprocesses: nothing pre-imported vs the heavy modules (timm, transformers' lazily loaded
    model code, lightning, matplotlib, the probe) and an RNG-drawing module imported first."""
    (tmp_path / "rng_hungry_fresh.py").write_text(HUNGRY)
    (tmp_path / "fresh.py").write_text(FRESH)
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    heavy = ",".join(["timm", "transformers.models.whisper.modeling_whisper", "lightning", "matplotlib.pyplot",
                      "audio.birds.probe", "rng_hungry_fresh"])
    runs = [subprocess.run([sys.executable, str(tmp_path / "fresh.py"), pre], env=env, capture_output=True,
                           text=True, timeout=600, cwd=tmp_path) for pre in ("", heavy)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    bare, loaded = (r.stdout.split() for r in runs)
    assert bare == loaded
    assert bare[2] == bare[3]  # the lazily importing builder: first build == second build
