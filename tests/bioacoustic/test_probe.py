"""audio.probe: metrics computed by hand, the prototypical head against Bird-MAE's formulas, and one
end-to-end run (cache written, then read) followed by audio.explain on its bundle."""
import json
import math

import pytest
import torch

from audio.birds.probe import cmap, make_heads, optimizer, scores, top1
from shared.heads import PrototypicalHead, Tokens


def test_cmap_is_mean_ap_over_classes_with_positives():
    s = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.4], [0.7, 0.3, 0.3], [0.1, 0.4, 0.2]])
    y = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    # class 0: positives ranked 1st and 3rd -> AP = (1/1 + 2/3) / 2; class 1 never present: left out;
    # class 2: its positive ranked 2nd -> AP = 1/2
    assert cmap(s, y) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)
    # top-1 over the 3 windows with a label: argmax 0 (hit), 0 (miss: label 2), 0 (hit)
    assert top1(s, y) == pytest.approx(2 / 3)
    out = scores(torch.logit(s), y)
    assert set(out) == {"test/cmap", "test/auroc", "test/top1"} and out["test/cmap"] == pytest.approx(cmap(s, y))


def test_prototypical_head_matches_the_paper_by_hand():
    head = PrototypicalHead(dim=2, num_classes=1, prototypes_per_class=2, focal=True, upsample=1)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    # CLS [1, 0], patches [2, 0] and [1, 1] on a 1 x 2 grid; focal: patches - CLS = [1, 0], [0, 1]
    t = Tokens(torch.tensor([[[1.0, 0.0], [2.0, 0.0], [1.0, 1.0]]]), 1, (1, 2))
    # prototype 0: max(cos([1,0],[1,0]) = 1, cos([0,1],[1,0]) = 0) = 1; prototype 1: max(0.7071, 0.7071);
    # Bird-MAE divides every cosine by 1.01 (changed on purpose: the plain cosine before)
    assert head.similarities(t)[0, 0].tolist() == pytest.approx([1 / 1.01, math.sqrt(0.5) / 1.01])
    assert float(head(t)[0, 0]) == pytest.approx((1.0 + math.sqrt(0.5)) / 1.01 - 2.0)  # weights 1, bias -2
    # unit rows [1, 0], [.7071, .7071]: Gram - I has two off-diagonal .7071 -> ||.||_F = 1, / (C P P = 4)
    assert float(head.orthogonality_loss()) == pytest.approx(0.25)


def test_prototypes_get_their_own_learning_rate():
    heads = make_heads(["linear", "prototypical"], 8, 3, prototypes_per_class=2)
    opt = optimizer(heads, lr=3e-4, prototype_lr=0.04, weight_decay=3e-4)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(heads["prototypical"].prototypes)] == 0.04
    assert lrs[id(heads["linear"].fc.weight)] == 3e-4 and lrs[id(heads["prototypical"].weight)] == 3e-4
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_similarity_maps_pool_to_the_head_similarities():
    from audio.birds.explain import similarity_maps

    torch.manual_seed(0)
    head = PrototypicalHead(16, 3, 4)
    t = Tokens(torch.randn(2, 1 + 32 * 8, 16), 1, (32, 8))
    maps = similarity_maps(head, t)
    assert maps.shape == (2, 3, 4, 64, 16)  # x2 upsampled (time, mel) patch grid
    assert torch.allclose(maps.flatten(3).amax(-1), head.similarities(t), atol=1e-6)


def test_demo_end_to_end_cache_then_explain(tmp_path, capsys):
    from audio.birds.synthetic import write_synthetic_birds
    from audio.birds import explain, probe
    from shared.cli import mark_demo_folder

    root = tmp_path / "birds"
    mark_demo_folder(root, "test")
    write_synthetic_birds(root, num_species=3, focal_per_species=3, soundscapes=2, seed=0)
    args = ["--config", str(probe.DEMO), "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--data.root", str(root), "--data.num_species", "3", "--data.focal_per_species", "3",
            "--data.soundscapes", "2", "--backbone_kwargs", '{"embed_dim": 16, "depth": 1, "num_heads": 2}',
            "--epochs", "2", "--prototypes_per_class", "4"]
    rows = probe.main(args)
    assert set(rows) == {"linear", "attentive", "prototypical"}
    for kind, row in rows.items():
        saved = json.loads((tmp_path / "out" / kind / "metrics.json").read_text())
        assert 0.0 <= saved["test/cmap"] <= 1.0 and 0.0 <= saved["test/auroc"] <= 1.0
        assert saved["epoch_s_recompute"] > 0 and saved["epoch_s_cached"] > 0
        assert saved["definition"] == "reference"  # BirdSet's metric code, named in every metrics.json
        assert saved["definitions"] == {"cmap": "birdset", "top1": "birdset", "auroc": "birdset"}
        assert saved["conventions"]["loss_reduction"] == "mean" and saved["conventions"]["short_clips"] == "waveform"
        bundle = json.loads((tmp_path / "out" / kind / "adapter" / "adapter.json").read_text())
        assert bundle["metrics"]["definition"] == "reference" and bundle["preprocessing"]["pad"] == "waveform"
    assert rows["prototypical"]["conventions"]["cosine_scale"] == 1.01
    assert rows["prototypical"]["conventions"]["patch_layout"] == "grid"
    assert rows["prototypical"]["trainable_params"] == 3 * 4 * 16 + 3 * 4 + 3  # prototypes, weights, biases
    assert "computed on cpu and cached" in capsys.readouterr().out
    again = probe.main(args + ["--time_recompute", "false"])
    assert "read from the cache" in capsys.readouterr().out
    assert again["prototypical"]["test/cmap"] == pytest.approx(rows["prototypical"]["test/cmap"])
    assert (tmp_path / "out" / "results.md").read_text().count("| prototypical |") == 1
    png = tmp_path / "ex.png"
    explain.main(["--adapter", str(tmp_path / "out" / "prototypical" / "adapter"),
                  str(root / "soundscapes" / "soundscape_000.wav"), "--output", str(png), "--threshold", "0.0"])
    printed = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and "| # | class | p | prototype |" in printed
    assert printed.count("| upchirp |") + printed.count("| downchirp |") + printed.count("| trill |") >= 3
    with pytest.raises(ValueError, match="not a prototypical probe bundle"):
        explain.main(["--adapter", str(tmp_path / "out" / "linear" / "adapter"), str(png)])
    # the reference's options, one switch away; a bad one fails before anything is written
    ref = probe.main(args + ["--time_recompute", "false", "--probes", "[prototypical]", "--patch_layout",
                             "birdmae_reshape", "--loss_reduction", "batchmean", "--metrics", "{top1: first_label}",
                             "--output_dir", str(tmp_path / "ref")])
    saved = json.loads((tmp_path / "ref" / "prototypical" / "metrics.json").read_text())
    assert saved["definition"] == "top1=first_label" and saved["conventions"]["patch_layout"] == "birdmae_reshape"
    assert ref["prototypical"]["test/cmap"] != pytest.approx(rows["prototypical"]["test/cmap"], abs=1e-9)
    meta = json.loads((tmp_path / "ref" / "prototypical" / "adapter" / "adapter.json").read_text())
    assert meta["head"]["patch_layout"] == "birdmae_reshape" and meta["head"]["cosine_scale"] == 1.01
    with pytest.raises(ValueError, match="--patch_layout must be one of grid, birdmae_reshape"):
        probe.main(args + ["--patch_layout", "transpose", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_explanation_locates_the_matching_patch_in_time_and_frequency():
    """A prototype equal to the token of time patch 10, mel patch 3 fires there: 1.6-1.76 s, mel bins 48-63."""
    from types import SimpleNamespace

    from audio.birds.explain import explain

    d = 8
    x = torch.zeros(1 + 32 * 8, d)
    x[1:, 0] = 1.0  # background patches point along axis 0; CLS is 0, so focal = plain patches
    x[1 + 10 * 8 + 3] = torch.tensor([0.0, 1.0] + [0.0] * (d - 2))
    head = PrototypicalHead(d, num_classes=2, prototypes_per_class=1, focal=True, upsample=2)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 1.0] + [0.0] * (d - 2), [0.0, 0.0, 1.0] + [0.0] * (d - 3)]))
        head.bias.fill_(0.0)
    clf = SimpleNamespace(head=head, tokens=lambda inp: Tokens(x[None], 1, (32, 8)))
    rows = explain(clf, torch.zeros(1, 512, 128), ["bird", "other"], threshold=0.5, window_start=2.0)
    assert [r["class"] for r in rows] == ["bird"]  # "other" never matches (its similarity is 0)
    r = rows[0]
    # bilinear x2 upsampling (align_corners False): the best cell reads source (9.75, 2.75), i.e. weight
    # 0.75 * 0.75 = 0.5625 on the patch and 0.4375 on background -> cos = 0.5625 / |(0.4375, 0.5625)|,
    # divided by Bird-MAE's 1.01
    assert r["similarity"] == pytest.approx(0.5625 / math.hypot(0.4375, 0.5625) / 1.01, abs=1e-5)
    assert r["share"] == pytest.approx(1.0)
    ti, fi = r["cell"]  # upsampled x2: the patch covers cells 20-21 in time, 6-7 in frequency
    assert ti in (20, 21) and fi in (6, 7)
    assert 2.0 + 1.6 - 1e-6 <= r["t_start"] < r["t_end"] <= 2.0 + 1.76 + 1e-6
    assert 48 <= r["mel_bins"][0] < r["mel_bins"][1] <= 64


def test_bird_report_puts_probe_kinds_side_by_side(tmp_path):
    from audio.birds import report as bird_report

    # rows of another metric definition (or none recorded: runs from before definitions were
    # written) are never averaged with the reference ones: they get their own, named rows
    for i, (kind, shots, value, definition) in enumerate([
            ("linear", None, 0.2, "reference"), ("prototypical", None, 0.4, "reference"),
            ("prototypical", None, 0.6, "reference"), ("linear", 5, 0.1, "reference"),
            ("prototypical", None, 0.9, "top1=first_label"), ("linear", None, 0.7, None)]):
        row = {"method": f"{kind}_probe", "dataset": "HSN", "few_shot": shots, "test/cmap": value}
        if definition:
            row["definition"] = definition
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(row))
    assert bird_report.main([str(tmp_path)]) == 0
    md = (tmp_path / "bird-report-test-cmap.md").read_text()
    assert "| HSN | 20.0 | 50.0 |" in md and "| HSN (5-shot) | 10.0 | - |" in md  # 0.4 and 0.6 averaged
    assert "| HSN [top1=first_label] | - | 90.0 |" in md and "| HSN [unrecorded] | 70.0 | - |" in md
    assert (tmp_path / "bird-report-test-cmap.png").stat().st_size > 5_000


def test_audio_report_writes_the_probe_kinds_table_for_probe_runs(tmp_path):
    """`python -m audio.report RUNS` on audio.probe runs: the bird table (probe kinds side by side)
    and the generic table, both on cmAP."""
    from audio import report

    for i, (kind, value) in enumerate([("linear", 0.2), ("prototypical", 0.4)]):
        row = {"method": f"{kind}_probe", "dataset": "HSN", "few_shot": None, "test/cmap": value,
               "run": f"hsn_{kind}", "backbone": "tiny-bird-mae", "trainable_params": 10 + i, "total_params": 100,
               "definition": "reference"}
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(row))
    report.main([str(tmp_path)])
    assert "| HSN | 20.0 | 40.0 |" in (tmp_path / "bird-report-test-cmap.md").read_text()
    generic = (tmp_path / "report-test-cmap.md").read_text()
    assert "| metric definition |" in generic and generic.count("| reference |") == 2  # the generic table names it
