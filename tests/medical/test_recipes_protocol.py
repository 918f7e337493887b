"""The medical recipes' evaluation choices (issue 13): what selects the checkpoint, weight decay,
CheXpert's label set, and that they reach the modules they configure."""
from __future__ import annotations

from pathlib import Path

import yaml

from medical.data import CheXpertDataModule
from medical.segmentation import SegmentationModule
from medical.train import MedicalClassificationModule

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "medical"
TINY = {"img_size": 32, "patch_size": 8}


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


def test_multilabel_recipes_select_on_auroc_as_the_study(med, tmp_path):
    for name in ("data/chestxray14.yaml", "data/chexpert.yaml"):
        model = recipe(name)["model"]
        assert model["monitor"] == "val/auroc" and model["decay_exclude"] is True and model["multilabel"]
        m = MedicalClassificationModule(backbone="tiny-vit", backbone_kwargs=TINY, num_classes=5,
                                        **{k: model[k] for k in ("monitor", "decay_exclude", "multilabel", "pos_weight")})
        [cb] = m.configure_callbacks()
        assert (cb.monitor, cb.mode) == ("val/auroc", "max")
    data = recipe("data/chexpert.yaml")["data"]["init_args"]
    root = med.write_chexpert(tmp_path)
    dm = CheXpertDataModule(**{**data, "root": str(root), "num_workers": 0})
    assert dm.labels == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def test_every_medical_training_recipe_excludes_norms_and_biases_from_decay():
    names = [f"data/{n}.yaml" for n in ("chestxray14", "chexpert", "image_folder", "medmnist")] + \
        [f"segmentation/{p.name}" for p in sorted((RECIPES / "segmentation").glob("*.yaml"))]
    for name in names:
        assert recipe(name)["model"]["decay_exclude"] is True, name
    seg = SegmentationModule(backbone_kwargs=TINY, decoder={"kind": "linear", "blocks": 1}, weight_decay=0.1,
                             decay_exclude=True)

    class _T:
        estimated_stepping_batches = 4

    seg._trainer = _T()
    groups = seg.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in seg.model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == {"decoder.norm.weight", "decoder.norm.bias", "decoder.classifier.bias"}


def test_pos_weight_auto_reads_the_training_split(med, tmp_path):
    import types

    import pytest
    import torch

    dm = CheXpertDataModule(med.write_chexpert(tmp_path), labels="competition", uncertainty="ignore")
    m = MedicalClassificationModule(backbone="tiny-vit", backbone_kwargs=TINY, num_classes=5, multilabel=True,
                                    pos_weight="auto")
    m._trainer = types.SimpleNamespace(datamodule=dm)
    m.setup("fit")
    t = dm.splits["train"].targets
    want = [(t[:, j] == 0).sum() / (t[:, j] == 1).sum() for j in range(5)]
    assert torch.allclose(m.pos_weight, torch.tensor(want, dtype=torch.float32))
    m2 = MedicalClassificationModule(backbone="tiny-vit", backbone_kwargs=TINY, num_classes=5, multilabel=True,
                                     pos_weight="auto")
    m2._trainer = types.SimpleNamespace(datamodule=object())
    with pytest.raises(ValueError, match="needs a data module with a pos_weight"):
        m2.setup("fit")
