"""The Whisper tiny.en FSDD table: leave-one-speaker-out folds, the take subsets, the report's
grouping of the folds, the PETL-AST recipes (built on Whisper tiny.en's architecture with random
weights: real parameter budgets, no package needed) and the zero-training baseline's digit words."""
from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
RECIPES = ("linear", "full", "pfeiffer_parallel", "pfeiffer_sequential", "houlsby_parallel", "houlsby_sequential",
           "conformer", "lora", "bitfit", "prefix", "prompt")


def _fake_fsdd(root: Path, speakers=SPEAKERS, takes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    (root / "recordings").mkdir(parents=True)
    for d in range(10):
        for s in speakers:
            for t in range(takes):
                n = 2000 + 100 * d
                x = 0.3 * np.sin(2 * np.pi * (200 + 150 * d) * np.arange(n) / 8000) + 0.01 * rng.standard_normal(n)
                sf.write(root / "recordings" / f"{d}_{s}_{t}.wav", x.astype(np.float32), 8000)
    return root


# --------------------------------------------------------------------------- folds and take subsets
def test_loso_folds_test_and_validate_every_speaker_once():
    from audio.fsdd import loso_folds

    folds = loso_folds(list(reversed(SPEAKERS)))
    assert folds == [("george", "jackson"), ("jackson", "lucas"), ("lucas", "nicolas"), ("nicolas", "theo"),
                     ("theo", "yweweler"), ("yweweler", "george")]
    with pytest.raises(ValueError, match="at least 3 speakers"):
        loso_folds(["a", "b", "b"])


def test_take_subsets_are_seeded_and_the_same_in_every_fold(tmp_path):
    from audio.fsdd import FSDDDataModule

    fsdd = _fake_fsdd(tmp_path / "fsdd", takes=4)

    def dm(test, val, seed=0):
        return FSDDDataModule(str(fsdd), test_speakers=[test], val_speakers=[val], train_takes=2, val_takes=1,
                              seed=seed, cache_dir=str(tmp_path / "c"))

    a, b = dm("theo", "nicolas"), dm("lucas", "theo")
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 80, "val": 10, "test": 40}  # test: every take
    george = [sorted(p.name for p, _ in d.splits["train"] if "_george_" in p.name) for d in (a, b)]
    assert george[0] == george[1] and len(george[0]) == 20  # george trains in both folds, on the same takes
    assert george[0] != sorted(p.name for p, _ in dm("theo", "nicolas", seed=1).splits["train"] if "_george_" in p.name)
    assert a.protocol == b.protocol == "speaker-disjoint (1 test, 1 validation speaker)"
    assert (a.test_fold, b.test_fold) == ("theo", "lucas")
    with pytest.raises(ValueError, match="train_takes must be a positive integer"):
        FSDDDataModule(str(fsdd), train_takes=0, cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------- the report groups the folds
def _row(test, val, acc, lr=5e-3, cpu=10.0):
    cfg = {"seed_everything": 0, "model": {"backbone": "whisper", "lr": lr, "methods": [{"name": "bitfit"}]},
           "data": {"class_path": "audio.fsdd.FSDDDataModule",
                    "init_args": {"root": "fsdd", "test_speakers": [test], "val_speakers": [val], "train_takes": 8}}}
    return {"run": f"bitfit-{test}", "backbone": "whisper", "dataset": "fsdd", "fold": test, "few_shot": None,
            "protocol": "speaker-disjoint (1 test, 1 validation speaker)", "method": "bitfit",
            "trainable_params": 100, "total_params": 1000, "test/acc": acc, "cpu_seconds": cpu, "config": cfg}


def test_report_averages_the_six_folds_into_one_row(tmp_path):
    """Fails when the fold keys (test_speakers / val_speakers) are not left out of the grouping key:
    the six folds would then be six rows of one run each."""
    from audio.fsdd import loso_folds
    from audio.report import main as report

    accs = [0.9, 0.8, 1.0, 0.7, 0.95, 0.85]
    for (test, val), acc in zip(loso_folds(SPEAKERS), accs):
        d = tmp_path / "runs" / "bitfit" / test
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_row(test, val, acc, cpu=10.0 + len(test))))
    other = tmp_path / "runs" / "bitfit_lr" / "theo"  # another learning rate: its own row
    other.mkdir(parents=True)
    (other / "metrics.json").write_text(json.dumps(_row("theo", "yweweler", 0.5, lr=1e-3)))

    from shared.report import collect, summarise

    rows = {s["variant"]: s for s in summarise(collect(tmp_path / "runs"), "test/acc")}
    assert set(rows) == {"lr=0.005", "lr=0.001"}
    six = rows["lr=0.005"]
    assert six["runs"] == 6 and six["folds"] == sorted(SPEAKERS)
    assert six["mean"] == pytest.approx(statistics.fmean(accs)) and six["std"] == pytest.approx(np.std(accs))
    assert six["cpu_seconds"] == pytest.approx(statistics.fmean(10.0 + len(s) for s in SPEAKERS))

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"config": {"loadavg_start": "0.1 0.2 0.3"}, "train_step": [
        {"key": "full", "method": None, "step_ratio": 1.0, "peak_rss_ratio": 1.0},
        {"key": "bitfit", "method": [{"name": "bitfit"}], "step_ratio": 0.61, "peak_rss_ratio": 0.72}]}))
    report([str(tmp_path / "runs"), "--bench", str(bench)])
    md = (tmp_path / "runs" / "report-test-acc.md").read_text()
    line = next(line for line in md.splitlines() if "lr=0.005" in line)
    assert "6 (george,jackson,lucas,nicolas,theo,yweweler)" in line and "86.67 ± 9.86" in line
    assert "| 0.61x | 0.72x |" in line and "| 16 |" in line  # step / memory vs full; mean CPU s
    assert (tmp_path / "runs" / "report-test-acc.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--bench .*not a benchmarks/peft_step.py result"):
        report([str(tmp_path / "runs"), "--bench", str(tmp_path / "missing.json")])


def test_loso_runs_one_recipe_per_speaker_and_the_report_makes_one_row(tmp_path, capsys):
    """`python -m audio.loso` on a 3-speaker fixture with the tiny random Whisper: three folds, each
    testing one speaker and validating on the next, averaged into one report row."""
    from audio.loso import main as loso
    from shared.report import collect, summarise

    fsdd = _fake_fsdd(tmp_path / "fsdd", speakers=("jackson", "nicolas", "theo"), takes=1)
    out = tmp_path / "runs" / "linear"
    rows = loso(["--config", str(ROOT / "domains/audio/data/fsdd.yaml"),
                 "--config", str(ROOT / "domains/audio/real/whisper_fsdd_linear.yaml"),
                 "--data.root", str(fsdd), "--model.backbone", "tiny-whisper",
                 "--model.backbone_kwargs", "{max_frames: 100, num_mel_bins: 80}",
                 "--model.depth_cache_dir", str(tmp_path / "depth"),
                 "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
                 "--trainer.check_val_every_n_epoch", "1", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.accelerator", "cpu", "--output_dir", str(out)])
    assert [r["fold"] for r in rows] == ["jackson", "nicolas", "theo"]
    assert [r["config"]["data"]["init_args"]["val_speakers"] for r in rows] == [["nicolas"], ["theo"], ["jackson"]]
    assert all(r["cpu_seconds"] > 0 and r["run"] == f"linear-{r['fold']}" for r in rows)
    assert sorted(p.parent.name for p in out.rglob("metrics.json")) == ["jackson", "nicolas", "theo"]
    (summary,) = summarise(collect(out), "test/acc")
    assert summary["runs"] == 3 and summary["mean"] == pytest.approx(statistics.fmean(r["test/acc"] for r in rows))
    again = loso(["--config", str(ROOT / "domains/audio/data/fsdd.yaml"), "--skip_done", "--folds", "theo",
                  "--config", str(ROOT / "domains/audio/real/whisper_fsdd_linear.yaml"), "--data.root", str(fsdd),
                  "--output_dir", str(out)])
    assert again == [] and "fold theo: done before" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--folds \['bob'\] are not speakers"):
        loso(["--config", str(ROOT / "domains/audio/real/whisper_fsdd_linear.yaml"), "--data.root", str(fsdd),
              "--folds", "bob"])


def test_loso_resume_continues_the_stopped_fold_and_leaves_finished_ones(tmp_path, monkeypatch, capsys):
    """`audio.loso --resume`: a finished fold (metrics.json, no stopped run) is left as it is, the fold
    whose stopped run left `last.ckpt` in its staging folder gets `--resume`, a fold never run starts
    afresh. (Passing `--resume` to every fold made the finished ones refuse: nothing to resume.)"""
    import audio.train
    from audio.loso import main as loso

    fsdd = _fake_fsdd(tmp_path / "fsdd", speakers=("jackson", "nicolas", "theo"), takes=1)
    out = tmp_path / "runs" / "lora"
    (out / "jackson").mkdir(parents=True)
    (out / "jackson" / "metrics.json").write_text("{}")                   # finished
    stage = out / ".nicolas.staging-abc123"
    stage.mkdir()
    (stage / "last.ckpt").write_bytes(b"0")                              # stopped, resumable
    calls = []
    monkeypatch.setattr(audio.train, "main", lambda argv: calls.append(argv) or {"test/acc": 1.0})
    loso(["--config", str(ROOT / "domains/audio/data/fsdd.yaml"), "--resume",
          "--config", str(ROOT / "domains/audio/real/whisper_fsdd_lora.yaml"), "--data.root", str(fsdd),
          "--output_dir", str(out)])
    ran = {argv[argv.index("--output_dir") + 1]: argv for argv in calls}
    assert sorted(Path(k).name for k in ran) == ["nicolas", "theo"]
    assert "--resume" in ran[str(out / "nicolas")] and "--resume" not in ran[str(out / "theo")]
    assert "fold jackson: done before" in capsys.readouterr().out


# --------------------------------------------------------------------------- recipes
def _methods(key):
    return yaml.safe_load((ROOT / f"domains/audio/real/whisper_fsdd_{key}.yaml").read_text())["model"]


def test_recipes_build_on_the_tiny_whisper_stand_in():
    """Every recipe's methods attach to the tiny random Whisper (same class, d_model 32) and train only
    what they should (fast; the real budgets are checked in the slow test below)."""
    from shared import peft
    from shared.backbones import anatomy, create
    from shared.heads import build_head

    x = torch.randn(2, 80, 100)
    base = create("tiny-whisper", max_frames=100, num_mel_bins=80)
    total = sum(p.numel() for p in base.parameters())
    for key in RECIPES:
        m = _methods(key)
        net = copy.deepcopy(base)
        peft.attach(net, m["methods"])
        model = peft.Classifier(net, build_head({**m["head"], "dim": anatomy(net).embed_dim, "num_classes": 10}))
        trainable = peft.summary(model)["trainable"]
        assert model(x).shape == (2, 10), key
        assert (trainable == total + 32 * 10 + 10) if key == "full" else (0 < trainable < total), (key, trainable)


@pytest.mark.slow
def test_recipes_build_on_whisper_tiny_en_with_the_petl_ast_budgets():
    """Each recipe's methods on Whisper tiny.en's architecture (random weights, 100 frames): the
    trainable parameters follow PETL-AST's budgets carried to d_model 384 (bottleneck 384 / 96 = 4,
    LoRA r 6, 25 prompts, 12 + 12 prefix tokens), and a forward gives 10 logits."""
    from audio.whisper import load_whisper
    from shared import peft
    from shared.backbones import anatomy
    from shared.heads import build_head

    d, layers, head, norm = 384, 4, 384 * 10 + 10, 2 * 384
    adapter = d * 4 + 4 + 4 * d + d  # down (with bias) + up (with bias), bottleneck 4
    expected = {
        "linear": head + norm,
        "pfeiffer_parallel": head + norm + layers * (adapter + norm),
        "houlsby_parallel": head + norm + layers * 2 * (adapter + norm),
        "lora": head + layers * 2 * 6 * (d + d),
        "prefix": head + norm + layers * 2 * 12 * d,
        "prompt": head + norm + layers * 25 * d,
    }
    expected["pfeiffer_sequential"] = expected["pfeiffer_parallel"]
    expected["houlsby_sequential"] = expected["houlsby_parallel"]
    x = torch.randn(2, 80, 100)
    counts = {}
    base = load_whisper(pretrained=False, max_frames=100)  # built once (random init of 8 M weights is slow)
    for key in RECIPES:
        m = _methods(key)
        assert m["backbone"] == "whisper" and m["backbone_kwargs"]["max_frames"] == 100
        net = copy.deepcopy(base)
        peft.attach(net, m["methods"])
        model = peft.Classifier(net, build_head({**m["head"], "dim": anatomy(net).embed_dim, "num_classes": 10}))
        counts[key] = peft.summary(model)["trainable"]
        assert model(x).shape == (2, 10), key
    for key, n in expected.items():
        assert counts[key] == n, (key, counts[key], n)
    assert counts["full"] == sum(p.numel() for p in base.parameters()) + head
    assert head + norm < counts["conformer"] < counts["houlsby_parallel"] * 2
    # every bias: per layer q, v, out (k_proj has none), fc1 (4d), fc2, two LayerNorms; final LayerNorm; 2 convs
    assert counts["bitfit"] == head + layers * (3 * d + 4 * d + d + 2 * d) + d + 2 * d


def test_recipes_share_one_data_cut_and_the_petl_ast_optimiser():
    cuts = set()
    for key in RECIPES:
        r = yaml.safe_load((ROOT / f"domains/audio/real/whisper_fsdd_{key}.yaml").read_text())
        m, data = r["model"], r["data"]["init_args"]
        assert (m["weight_decay"], m["betas"], m["eps"]) == (0.1, [0.9, 0.98], 1e-6), key
        lr = {"full": 5e-5, "linear": 1e-3, "prefix": 1e-2, "prompt": 1e-2}.get(key, 5e-3)
        assert m["lr"] == lr, key
        assert data["frontend"] == "whisper" and data["target_frames"] == 100 and data["specaugment"] is False
        cuts.add((data["train_takes"], data["val_takes"], data["test_takes"], data["batch_size"]))
        if key != "linear":
            cuts.add(("epochs", r["trainer"]["max_epochs"]))
    assert len(cuts) == 2, cuts  # one data cut, one epoch count for every trained method


def test_benchmark_rows_are_the_recipes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import peft_step

    rows = peft_step.train_configs(4, "whisper-tiny-en")
    assert [k for k, _, _ in rows] == list(RECIPES[1:2] + RECIPES[:1] + RECIPES[2:])
    by = {k: m for k, _, m in rows}
    assert by["full"] == [{"name": "full"}] and by["lora"] == _methods("lora")["methods"]
    assert peft_step.depth_config(4, "whisper-tiny-en")[2]["targets"] == r"layers\.(3)\.self_attn\.(q_proj|v_proj)"


# --------------------------------------------------------------------------- the zero-training baseline
@pytest.mark.parametrize("text, digit", [
    ("Zero.", 0), ("Oh!", 0), ("one", 1), ("Won.", 1), ("Two.", 2), ("To.", 2), ("too", 2), ("3", 3), ("Three?", 3),
    ("Four.", 4), ("For.", 4), ("five", 5), ("Six.", 6), ("SEVEN", 7), ("Eight.", 8), ("Ate.", 8), ("Nine.", 9),
    (" 9.", 9), ("Okay, five.", 5), ("10", None), ("Hello.", None), ("", None), ("Twenty", None),
])
def test_digit_words(text, digit):
    from audio.whisper_digits import digit_of

    assert digit_of(text) == digit


def test_batched_transcription_equals_one_clip_at_a_time():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from audio.whisper import transcribe, transcribe_batch

    class Tok:
        def token_to_id(self, t):
            return {"<|startoftranscript|>": 61, "<|notimestamps|>": 62}.get(t)

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=16, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=32, max_target_positions=16, pad_token_id=60, eos_token_id=60,
                        bos_token_id=61, decoder_start_token_id=61, suppress_tokens=[5], begin_suppress_tokens=[60])
    model = WhisperForConditionalGeneration(cfg).eval()
    waves = [0.1 * torch.randn(n) for n in (3000, 8000, 500)]
    batched = transcribe_batch(waves, model, Tok(), max_tokens=6)
    assert batched == [transcribe(w, model, Tok(), max_tokens=6) for w in waves]
    assert all(0 < len(t.split()) <= 6 and "5" not in t.split() for t in batched)
    assert transcribe_batch([], model, Tok()) == []


def test_baseline_refuses_unknown_speakers(tmp_path):
    from audio.whisper_digits import main

    fsdd = _fake_fsdd(tmp_path / "fsdd", speakers=("theo",), takes=1)
    with pytest.raises(ValueError, match=r"--speakers \['bob'\] are not in"):
        main(["--root", str(fsdd), "--speakers", "bob", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_plot_draws_the_zero_training_row_as_a_level_line(tmp_path):
    """A row with 0 trainable parameters has no place on the log axis: a dashed level line; accuracy
    bars past 100 % are cut at the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared import report

    for i, (method, acc, n) in enumerate([("transcribe", 0.6, 0), ("transcribe", 0.7, 0),
                                          ("lora", 0.9, 4000), ("lora", 1.0, 4000)]):
        d = tmp_path / f"r{i}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"dataset": "fsdd", "backbone": "whisper", "method": method,
                                                    "test/acc": acc, "trainable_params": n, "fold": i % 2,
                                                    "total_params": 10_000, "run": f"r{i}"}))
    fig = report.figure(report.summarise(report.collect(tmp_path), "test/acc"), "test/acc")
    try:
        ax = fig.axes[0]
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([65.0, 65.0])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "fsdd: transcribe (whisper): 0 trained, 2 runs, mean" in legend
        assert ax.get_ylim()[1] == pytest.approx(101.0) and ax.get_ylim()[0] < 65.0
    finally:
        plt.close(fig)
