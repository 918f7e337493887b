"""Every audio recipe runs: each method recipe with the ESC-50 data recipe, each data recipe
with the LoRA method recipe, and the ready-made `esc50_adapter.yaml`, all on a tiny random AST
and the tiny fixture datasets of conftest.py (written once per module, features cached once).

The method list is read from `domains/audio/methods/`, so a new recipe is tested as soon as it
is added. Each run must carry the recipe's OWN hyperparameters (read from its YAML) all the way
to the optimizer, the hparams, the metrics row and the saved bundle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from shared.cli import STAGE_ENV, method_label

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "audio"
METHODS = sorted((RECIPES / "methods").glob("*.yaml"))
DATA = {p.stem: p for p in sorted((RECIPES / "data").glob("*.yaml"))}
TINY_AST = "{{max_length: {frames}, num_mel_bins: 128, hidden_size: 32, layers: 2, heads: 4}}"

_SHARED: dict[str, object] = {}  # module-wide: fixture datasets and the feature cache, written once


def test_recipe_folders_are_complete():
    assert len(METHODS) >= 14, [p.name for p in METHODS]
    assert set(DATA) == {"esc50", "us8k", "speech_commands", "fsc", "fsdd"}  # fsdd: tests/audio/test_newcomer.py


@pytest.fixture(autouse=True)
def _clean_stage_env():
    saved = os.environ.pop(STAGE_ENV, None)
    yield
    os.environ.pop(STAGE_ENV, None)
    if saved is not None:
        os.environ[STAGE_ENV] = saved


@pytest.fixture
def shared_dir(tmp_path_factory) -> Path:
    if "dir" not in _SHARED:
        _SHARED["dir"] = tmp_path_factory.mktemp("audio_recipes")
    return _SHARED["dir"]


@pytest.fixture
def datasets(afx, shared_dir):
    """conftest.py's writers (via `afx`), called once per module: {name: (root, expected labels)}."""
    if "datasets" not in _SHARED:
        intents = sorted(f"{a}|{o}|{loc}" for a, o, loc, _ in afx.FSC_INTENTS)
        _SHARED["datasets"] = {
            "esc50": (afx.make_esc50(shared_dir / "ESC-50-master"), afx.ESC50_CATEGORIES),
            "us8k": (afx.make_us8k(shared_dir / "UrbanSound8K"), afx.US8K_CLASSES),
            "speech_commands": (shared_dir / "speech_commands_v0.02", sorted(afx.GSC_WORDS)),
            "fsc": (shared_dir / "fluent_speech_commands_dataset", intents),
        }
        afx.make_gsc(shared_dir / "speech_commands_v0.02")
        afx.make_fsc(shared_dir / "fluent_speech_commands_dataset")
    return _SHARED["datasets"]


@pytest.fixture
def captured(monkeypatch):
    """The model and data module a run built (audio.train passes them to `check_frames`)."""
    import audio.train as train

    seen = {}
    original = train.check_frames

    def spy(model, data):
        seen["model"], seen["data"] = model, data
        original(model, data)

    monkeypatch.setattr(train, "check_frames", spy)
    return seen


def tiny_args(data_root, cache, out, frames=100, *extra):
    return ["--model.backbone", "tiny-ast", "--model.backbone_kwargs", TINY_AST.format(frames=frames),
            "--data.root", str(data_root), "--data.target_frames", str(frames), "--data.num_workers", "0",
            "--data.cache_dir", str(cache), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--output_dir", str(out),
            *extra]


def read_bundle(out: Path) -> dict:
    assert (out / "metrics.json").is_file()
    assert (out / "adapter" / "adapter.safetensors").stat().st_size > 0
    return json.loads((out / "adapter" / "adapter.json").read_text())


@pytest.mark.parametrize("recipe", METHODS, ids=[p.stem for p in METHODS])
def test_method_recipe_runs_with_its_own_hyperparameters(recipe, datasets, shared_dir, captured, tmp_path):
    from audio.train import main

    want = yaml.safe_load(recipe.read_text())["model"]
    root, labels = datasets["esc50"]
    out = tmp_path / "run"
    row = main(["--config", str(DATA["esc50"]), "--config", str(recipe),
                *tiny_args(root, shared_dir / "cache", out)])

    model = captured["model"]
    hp = model.hparams
    # the recipe's values, not the module's defaults, reached the model ...
    assert hp.methods == want["methods"]
    assert hp.lr == pytest.approx(want["lr"])
    assert tuple(hp.betas) == pytest.approx(tuple(want["betas"]))
    assert hp.eps == pytest.approx(want["eps"]) and hp.weight_decay == pytest.approx(want["weight_decay"])
    assert hp.head == want["head"]
    # ... and the optimizer that actually trained (every parameter group)
    groups = model.trainer.optimizers[0].param_groups
    assert groups
    for g in groups:
        assert g["initial_lr"] == pytest.approx(want["lr"])
        assert tuple(g["betas"]) == pytest.approx(tuple(want["betas"]))
        assert g["eps"] == pytest.approx(want["eps"]) and g["weight_decay"] == pytest.approx(want["weight_decay"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.model.parameters())

    # metrics row: written, equal to what main returned, names the recipe's method
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(row, default=str))
    assert row["dataset"] == "esc50" and row["fold"] == 1 and row["backbone"] == "tiny-ast"
    assert row["method"] == method_label(want["methods"])
    assert 0 < row["trainable_params"] <= row["total_params"]
    if [m["name"] for m in want["methods"]] == ["full"]:
        assert row["trainable_params"] == row["total_params"]
    else:
        assert row["trainable_params"] < row["total_params"]
    assert 0.0 <= row["test/acc"] <= 1.0

    # bundle: the recipe's methods (every key the recipe sets), head and the data's labels
    meta = read_bundle(out)
    assert [m["name"] for m in meta["methods"]] == [m["name"] for m in want["methods"]]
    for got, cfg in zip(meta["methods"], want["methods"]):
        assert {k: got.get(k) for k in cfg} == cfg
    assert {k: meta["head"][k] for k in want["head"]} == want["head"]
    assert meta["labels"] == list(labels) and meta["head"]["num_classes"] == len(labels)
    assert meta["preprocessing"]["frontend"] == "fbank_ast" and meta["preprocessing"]["target_frames"] == 100
    assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name]


DATA_MODULES = {"esc50": "ESC50DataModule", "us8k": "UrbanSound8KDataModule",
                "speech_commands": "SpeechCommandsDataModule", "fsc": "FluentSpeechCommandsDataModule"}


@pytest.mark.parametrize("name", sorted(DATA_MODULES))
def test_data_recipe_runs_with_lora(name, datasets, shared_dir, captured, tmp_path):
    import audio.datasets as ad
    from audio.train import main

    recipe = yaml.safe_load(DATA[name].read_text())
    assert recipe["data"]["class_path"] == f"audio.datasets.{DATA_MODULES[name]}"
    root, labels = datasets[name]
    out = tmp_path / "run"
    frames = 48  # the fixture clips are 0.3-0.4 s
    row = main(["--config", str(DATA[name]), "--config", str(RECIPES / "methods" / "lora.yaml"),
                *tiny_args(root, shared_dir / "cache", out, frames)])

    data = captured["data"]
    assert type(data) is getattr(ad, DATA_MODULES[name])
    assert data.labels == list(labels) and data.num_classes == len(labels)
    assert data.fbank.target_frames == frames
    # SpecAugment where PETL-AST uses it (ESC-50, UrbanSound8K), never on speech
    assert (data.augment is not None) == (name in ("esc50", "us8k"))
    # the recipe's own data settings that were not overridden
    assert data.batch_size == recipe["data"]["init_args"]["batch_size"]
    if "test_fold" in recipe["data"]["init_args"]:
        assert data.test_fold == recipe["data"]["init_args"]["test_fold"]
    assert captured["model"].hparams.num_classes == len(labels)
    assert row["dataset"] == name and row["method"] == "lora" and row["trainable_params"] > 0
    meta = read_bundle(out)
    assert meta["labels"] == list(labels) and meta["head"]["num_classes"] == len(labels)
    assert meta["preprocessing"]["target_frames"] == frames


@pytest.mark.parametrize("name", sorted(DATA_MODULES))
def test_data_recipe_frames_agree(name):
    """A recipe's AST frame count equals its frontend's, and the dataset's PETL-AST length."""
    from audio.features import TARGET_FRAMES

    recipe = yaml.safe_load(DATA[name].read_text())
    assert recipe["model"]["backbone_kwargs"]["max_length"] == recipe["data"]["init_args"]["target_frames"] \
        == TARGET_FRAMES[name]


def test_esc50_adapter_recipe_parses(capsys, datasets):
    """`--print_config`: the ready-made recipe parses, and says what its comment promises."""
    from audio.train import main

    root, _ = datasets["esc50"]
    with pytest.raises(SystemExit) as e:
        main(["--config", str(RECIPES / "esc50_adapter.yaml"), "--data.root", str(root), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["backbone"] == "ast"
    assert cfg["model"]["backbone_kwargs"]["max_length"] == cfg["data"]["init_args"]["target_frames"] == 500
    assert cfg["model"]["methods"] == [{"name": "adapter", "kind": "conformer", "placement": "ffn",
                                        "mode": "parallel", "reduction": 96, "train_norms": True, "kernel_size": 31}]
    assert cfg["model"]["lr"] == 5e-3 and cfg["model"]["betas"] == [0.9, 0.98] and cfg["model"]["eps"] == 1e-6
    assert cfg["data"]["class_path"] == "audio.datasets.ESC50DataModule"
    assert STAGE_ENV not in os.environ


def test_esc50_adapter_recipe_runs_tiny(datasets, shared_dir, captured, tmp_path):
    from audio.train import main

    root, labels = datasets["esc50"]
    out = tmp_path / "run"
    row = main(["--config", str(RECIPES / "esc50_adapter.yaml"),
                *tiny_args(root, shared_dir / "cache", out, 100, "--trainer.fast_dev_run", "1")])
    assert type(captured["data"]).__name__ == "ESC50DataModule"
    assert row["method"] == "adapter(conformer,ffn,parallel)" and row["trainable_params"] > 0
    meta = read_bundle(out)
    assert meta["methods"][0]["kind"] == "conformer" and meta["methods"][0]["kernel_size"] == 31
    assert meta["labels"] == list(labels)
