"""Issue 17, item 21: vision pictures read on their own. The overview of vision.predict names the
bundle's classes in a legend, gives saliency a 0-1 colour bar and depth a relative one, notes the
normals' RGB encoding; every map PNG carries its legend as text; the Delta_m plot labels its
markers and says "1 run". Checked on the figures' artists (Agg), not on pixels."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from vision import predict
from vision import report as vreport

META = {"vision": {"layout": "pascal_context", "tasks": {"semseg": {"channels": 21}, "human_parts": {"channels": 7}}}}


def _logits(channels: int, winners: list[int], h: int = 8, w: int = 8) -> torch.Tensor:
    """(C, H, W) logits whose argmax is winners[i] on the i-th horizontal band."""
    out = torch.zeros(channels, h, w)
    for i, c in enumerate(winners):
        out[c, i * h // len(winners):(i + 1) * h // len(winners)] = 5.0
    return out


def _maps():
    return {"semseg": predict.render("classes", _logits(21, [0, 15, 15, 15])),  # background 25 %, person 75 %
            "human_parts": predict.render("classes", _logits(7, [1, 2])),
            "saliency": predict.render("binary", torch.zeros(1, 8, 8)),
            "normals": predict.render("normals", torch.ones(3, 8, 8)),
            "depth": predict.render("depth", torch.linspace(0, 1, 64).view(1, 8, 8))}


KINDS = {"semseg": "classes", "human_parts": "classes", "saliency": "binary", "normals": "normals", "depth": "depth"}


def test_class_names_come_from_the_bundle_its_layout_or_a_numbered_fallback():
    assert predict.class_names(META, "semseg", 21)[15] == "person"
    assert predict.class_names(META, "human_parts", 7)[1:3] == ["head", "torso"]
    assert predict.class_names({"vision": {"layout": "nyud"}}, "semseg", 40)[0] == "wall"
    own = {"vision": {"layout": "folder", "tasks": {"semseg": {"channels": 2, "classes": ["sky", "road"]}}}}
    assert predict.class_names(own, "semseg", 2) == ["sky", "road"]
    assert predict.class_names({"vision": {"layout": "folder"}}, "semseg", 3) == ["class 0", "class 1", "class 2"]
    assert predict.class_names(META, "semseg", 5) == [f"class {i}" for i in range(5)]  # 5 != 21: not VOC


def test_class_ids_invert_the_palette():
    ids = np.random.default_rng(0).integers(0, 40, (6, 7))
    assert np.array_equal(predict.class_ids(predict.palette(40)[ids], 40), ids)


def test_overview_has_titles_class_legends_colour_bars_and_the_normals_note():
    names = {t: predict.class_names(META, t, n) for t, n in (("semseg", 21), ("human_parts", 7))}
    fig = predict.overview(np.zeros((8, 8, 3), np.uint8), _maps(), KINDS, names, "x.jpg: demo")
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title() for ax in panels] == [
            "input", "semseg: predicted class", "human_parts: predicted class", "saliency: probability",
            "normals: surface normals", "depth: depth"]
        sem = panels[1].get_legend()
        assert [t.get_text() for t in sem.get_texts()] == ["person (75%)", "background (25%)"]
        assert sem.get_title().get_text() == "class (share of pixels)"
        assert [t.get_text() for t in panels[2].get_legend().get_texts()] == ["head (50%)", "torso (50%)"]
        bars = {ax.get_ylabel(): ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel()}
        assert set(bars) == {"probability (0-1)", "relative depth (1 = nearest)"}
        assert bars["probability (0-1)"].get_ylim() == pytest.approx((0.0, 1.0))
        assert any("(n_x + 1) / 2" in t.get_text() for t in panels[4].texts)
        assert fig.get_suptitle() == "x.jpg: demo"
    finally:
        plt.close(fig)


def test_a_long_class_list_is_cut_to_the_largest_classes():
    names = {"semseg": predict.NYU40}
    pic = predict.render("classes", _logits(40, list(range(16)), h=16))
    fig = predict.overview(np.zeros((16, 8, 3), np.uint8), {"semseg": pic}, {"semseg": "classes"}, names, "t")
    try:
        texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
        assert len(texts) == predict.LEGEND_MAX + 1 and texts[-1] == f"+{16 - predict.LEGEND_MAX} more classes"
    finally:
        plt.close(fig)


def test_map_pngs_carry_their_legend_and_main_writes_the_overview(tmp_path, capsys):
    from vision.model import build_model
    from vision.tasks import make_task
    from vision.train import save_bundle

    torch.manual_seed(0)
    model = build_model("tiny-swin", {"semseg": make_task("semseg"), "saliency": make_task("saliency")},
                        [{"name": "bitfit"}], {"img_size": 32}, decoder_width=8)
    model.image_size = 32
    bundle = tmp_path / "run" / "adapter"
    save_bundle(model.eval(), bundle, {"data": {"size": 32, "layout": "pascal_context"}}, {"test": {}, "definition": {}})
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    predict.main(["--adapter", str(bundle), "--out", str(out), str(img)])
    assert capsys.readouterr().out.strip().endswith(f"{out / 'photo_overview.png'}")
    sem = Image.open(out / "photo_semseg.png")
    assert sem.size == (40, 24) and "15 person = RGB(192, 128, 128)" in sem.text["Description"]
    assert Image.open(out / "photo_saliency.png").text["Description"].startswith("probability map")
    assert Image.open(out / "photo_overview.png").size[0] > 400


def test_delta_m_plot_labels_single_runs_and_averages_repeated_ones():
    fig = vreport.figure([("polyhistor_lite", 1000, -2.0), ("bitfit", 50, -8.0), ("bitfit", 50, -6.0)], "full")
    try:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "polyhistor_lite (1,000 trainable): 1 run" in legend
        assert "bitfit (50 trainable): 2 runs, mean ± std" in legend
        assert sorted(t.get_text() for t in ax.texts) == ["bitfit (2 runs): -7.00%", "polyhistor_lite (1 run): -2.00%"]
        assert len(ax.containers) == 1  # one error bar: the repeated method; the single run has none
        assert ax.get_xlabel().startswith("trainable parameters (count, log scale")
        assert ax.get_ylabel() == "Delta_m vs single-task full (%)" and "3 runs" in ax.get_title()
    finally:
        plt.close(fig)
    fig = vreport.figure([("polyhistor_lite", 1000, -2.0)], "full")
    try:
        assert fig.axes[0].get_xlim() == pytest.approx((100, 10_000))  # a decade either side, not a sliver
    finally:
        plt.close(fig)
