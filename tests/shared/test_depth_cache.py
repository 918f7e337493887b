"""Depth caching (shared.depth_cache): the cached path equals the normal one, method x backbone;
what cannot be cached is refused with the reason; the cache on disk round-trips and is keyed right;
a Lightning fit trains from it (and falls back, with one warning line, when it must)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shared import peft
from shared.backbones import Resume
from shared.depth_cache import (DepthCache, DepthCacheRefused, DepthRows, augmentation, cached_loader, collate_rows,
                                data_identity, depth_plan, frozen_fingerprint, write_rows)
from shared.heads import LinearHead

from ..conftest import make_backbone, make_input

# family -> (backbone overrides giving 3+ blocks, block name pattern, LoRA leaf, head pooling)
FAMILIES = {
    "vit": ({"depth": 3}, r"blocks\.{}", r"attn\.qkv", "cls"),
    "vit_reg": ({"depth": 3}, r"blocks\.{}", r"attn\.qkv", "cls+patch_mean"),
    "ast": ({"layers": 3}, r"layers\.{}", r"attention\.(q_proj|v_proj)", "mean"),
    "swin": ({"depths": (2, 2)}, r"layers\.{}", r"attn\.qkv", "patch_mean"),  # 4 blocks, 2 stages
    "bert": ({"layers": 3}, r"encoder\.layer\.{}", r"attention\.self\.(query|value)", "cls"),
    "whisper": ({"layers": 3}, r"layers\.{}", r"self_attn\.(q_proj|v_proj)", "mean"),
}
# Swin's blocks by index: 0 = layers.0.blocks.0, 1 = layers.0.blocks.1 (mid-stage), 2 = layers.1.blocks.0 (a
# stage boundary: after patch merging), 3 = layers.1.blocks.1
SWIN_BLOCK = {0: r"0\.blocks\.0", 1: r"0\.blocks\.1", 2: r"1\.blocks\.0", 3: r"1\.blocks\.1"}


def _lora_from(family: str, k: int, n: int):
    _, block, leaf, _ = FAMILIES[family]
    ids = "|".join(SWIN_BLOCK[i] if family == "swin" else str(i) for i in range(k, n))
    return peft.LoRA(r=2, alpha=4, targets=block.format(f"({ids})") + r"\." + leaf)


# method -> (make(family, n_blocks), expected lowest adapted block(n_blocks))
METHODS = {
    "lora_from_1": (lambda f, n: [_lora_from(f, 1, n)], lambda n: 1),
    "lora_last_2": (lambda f, n: [_lora_from(f, n - 2, n)], lambda n: n - 2),  # Swin: a stage boundary
    "adapter_last": (lambda f, n: [peft.Adapter(placement="ffn", mode="parallel", bottleneck=4, blocks=[n - 1])],
                     lambda n: n - 1),
    "adapter_lora_mix": (lambda f, n: [peft.Adapter(placement="mhsa", mode="sequential", bottleneck=4, blocks=[n - 1]),
                                       _lora_from(f, n - 2, n)], lambda n: n - 2),
    "linear_probe": (lambda f, n: [], lambda n: n),
}


def _inputs(family: str):
    x = make_input(family)
    if family == "bert":  # a padded second row: the mask must travel with the tokens
        return {"input_ids": x, "attention_mask": torch.tensor([[1] * 10, [1] * 6 + [0] * 4])}
    return x


def _classifier(family: str, methods) -> peft.Classifier:
    overrides, *_, pool = FAMILIES[family]
    backbone = make_backbone(family, **overrides)
    peft.attach(backbone, methods, compute_fingerprint=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised up / B tensors would hide a method the cached path skipped
        for p in backbone.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return peft.Classifier(backbone, LinearHead(32, 3, pool=pool)).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_logits_equal_the_normal_forward(family, method):
    make, expected = METHODS[method]
    n = {"swin": 4}.get(family, 3)
    clf = _classifier(family, make(family, n))
    x = _inputs(family)
    plan = depth_plan(clf)
    assert (plan.block, plan.n_blocks) == (expected(n), n)
    with torch.no_grad():
        ref = clf(x)
        resume = clf.anatomy.tokens_entering(plan.block, x)
        got = clf(resume)  # Classifier -> Anatomy.forward_from: blocks k.., final norm, head
        if make(family, n):  # the methods change the output: the cached path ran their hooks
            bare = peft.Classifier(make_backbone(family, **FAMILIES[family][0]), clf.head).eval()
            assert (bare(x) - ref).abs().max() > 1e-3
    assert isinstance(resume, Resume) and resume.block == plan.block
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_rows_written_to_disk_replay_the_normal_forward(family, tmp_path):
    """fp32 storage through write_rows -> DepthRows -> collate: the same logits (1e-5); fp16 / bf16 close."""
    clf = _classifier(family, METHODS["lora_from_1"][0](family, 3))
    if family == "vit":
        xs = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        loader = DataLoader(TensorDataset(xs, torch.arange(5)), batch_size=2)
    else:
        ids = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(3))
        mask = (torch.arange(10)[None] < torch.tensor([10, 4, 7, 10, 2])[:, None]).long()
        rows = [({"input_ids": ids[i], "attention_mask": mask[i]}, torch.tensor(i)) for i in range(5)]
        loader = DataLoader(rows, batch_size=2)
    diffs = {}
    for storage in ("fp32", "fp16", "bf16"):
        meta = write_rows(clf, loader, 1, storage, tmp_path / storage)
        assert meta["n"] == 5 and meta["masked"] == (family == "bert")
        cached = DepthRows(tmp_path / storage)
        batch = collate_rows(cached.meta)([cached[i] for i in range(5)])
        resume, y = batch
        assert torch.equal(y, torch.arange(5))
        with torch.no_grad():
            full = next(iter(DataLoader(loader.dataset, batch_size=5)))[0]
            ref, got = clf(full), clf(resume)
        if family == "bert":
            assert torch.equal(resume.mask, full["attention_mask"])
        diffs[storage] = (got - ref).abs().max().item()
    assert diffs["fp32"] < 1e-5
    assert diffs["fp16"] < 2e-2 and diffs["bf16"] < 1e-1  # storage rounding only (measured: ~1e-3 / ~1e-2)
    assert diffs["fp16"] <= diffs["bf16"]


REFUSED = {
    "prompt_deep": ([peft.Prompt(n_tokens=2, deep=True)], "block 0"),
    "prompt_shallow": ([peft.Prompt(n_tokens=2, deep=False)], "block 0"),
    "prefix": ([peft.Prefix(n_tokens=2)], "block 0"),
    "lora_patch_embed": ([peft.LoRA(r=2, targets=["patch_embed.proj"])], "outside the transformer blocks"),
    "full": ([peft.Full()], "outside the transformer blocks"),
    "bitfit": ([peft.BitFit()], "outside the transformer blocks"),
    "norm_tuning_all": ([peft.NormTuning()], "block 0"),
    "lora_everywhere": ([peft.LoRA(r=2, targets=["qkv"])], "block 0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_methods_below_k_or_outside_the_blocks_are_refused(case):
    methods, words = REFUSED[case]
    backbone = peft.attach(make_backbone("vit", depth=3), methods, compute_fingerprint=False)
    with pytest.raises(DepthCacheRefused, match=words):
        depth_plan(backbone)


@pytest.mark.parametrize("methods,k", [
    ([peft.NormTuning(final_only=True)], 3),  # the final norm runs after every block
    ([peft.HyperAdapter(placement="ffn", bottleneck=4, embed_dim=8, proj_dim=6, blocks=[1, 2])], 1),  # shared net on the root
    ([peft.FiLM(placement="both", blocks=[2])], 2),
])
def test_methods_in_the_top_blocks_set_k(methods, k):
    assert depth_plan(peft.attach(make_backbone("vit", depth=3), methods, compute_fingerprint=False)).block == k


def test_decoders_are_refused_with_the_reason():
    backbone = peft.attach(make_backbone("llama"), [], compute_fingerprint=False)
    with pytest.raises(DepthCacheRefused, match="causal decoders"):
        depth_plan(backbone)


def test_frozen_fingerprint_covers_exactly_the_frozen_part():
    backbone = peft.attach(make_backbone("vit", depth=3), [_lora_from("vit", 2, 3)], compute_fingerprint=False)
    fp = frozen_fingerprint(backbone, 2)
    with torch.no_grad():
        backbone.blocks[2].mlp.fc1.weight.add_(1.0)  # at or above k: the cached tokens do not depend on it
        next(p for n, p in backbone.named_parameters() if "lora_B" in n).add_(1.0)  # trained
        backbone.norm.weight.add_(1.0)
    assert frozen_fingerprint(backbone, 2) == fp
    assert frozen_fingerprint(backbone, 3) != fp  # another k
    with torch.no_grad():
        backbone.blocks[1].mlp.fc1.weight.add_(1e-3)
    assert frozen_fingerprint(backbone, 2) != fp
    with torch.no_grad():
        backbone.blocks[1].mlp.fc1.weight.sub_(1e-3)
        backbone.pos_embed.add_(1e-3)
    assert frozen_fingerprint(backbone, 2) != fp


class _Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3), 0


class _Flagged:
    augment = True


def test_augmentation_is_detected_and_the_rng_is_left_alone():
    ds = TensorDataset(torch.randn(4, 3), torch.zeros(4))
    assert augmentation(None, ds) is None
    assert "data.augment" in augmentation(_Flagged(), ds)
    state = torch.get_rng_state()
    assert "read twice" in augmentation(None, _Noisy())
    assert torch.equal(torch.get_rng_state(), state)


def test_data_identity_follows_files_and_recipe_not_loader_settings(tmp_path):
    f = tmp_path / "a.npy"
    f.write_bytes(b"12345")

    class DM:
        def __init__(self, root, batch_size=4, seed=0):
            self.root, self.batch_size, self.seed = root, batch_size, seed

    ds = TensorDataset(torch.zeros(2))
    base = data_identity(DM(str(f)), ds)
    assert data_identity(DM(str(f), batch_size=64), ds) == base
    assert data_identity(DM(str(f), seed=1), ds) != base
    f.write_bytes(b"123456")
    assert data_identity(DM(str(f)), ds)["files"] != base["files"]


def test_tagger_windows_are_stored_at_their_length_and_repadded(tmp_path):
    """Text token tagging: per-token labels and extra targets follow each window; a batch the cache
    was not written with is re-padded as the text collate pads it (tags IGNORE, extras NaN)."""
    from text.tagger import HashTokenizer, WindowEncoder, collate

    enc = WindowEncoder(HashTokenizer(128), max_length=12, overlap=2, reader_prefix=False)
    words = [f"w{i}" for i in range(40)]
    windows = enc.encode(words, "", tags=[i % 3 for i in range(40)], extra=[[float(i % 2)] for i in range(40)])
    windows += enc.encode(words[:5], "", tags=[0] * 5, extra=[[1.0]] * 5)  # a short one
    assert len({len(w.input_ids) for w in windows}) > 1
    pad = HashTokenizer.pad_id
    loader = DataLoader(windows, batch_size=3, collate_fn=lambda ws: collate(ws, pad))
    clf = _classifier("bert", [_lora_from("bert", 1, 3)])
    write_rows(clf, loader, 1, "fp32", tmp_path)
    rows = DepthRows(tmp_path)
    assert rows.meta["per_token"] == [True, True] and rows.meta["pad"] == [-100, "nan"]
    pick = [0, len(windows) - 1, 2]  # a batch the write never saw
    resume, labels, extra = collate_rows(rows.meta)([rows[i] for i in pick])
    inputs, labels_ref, extra_ref = collate([windows[i] for i in pick], pad)
    assert torch.equal(labels, labels_ref) and torch.equal(extra.isnan(), extra_ref.isnan())
    assert torch.equal(extra.nan_to_num(), extra_ref.nan_to_num())
    assert torch.equal(resume.mask, inputs["attention_mask"])
    with torch.no_grad():
        real = inputs["attention_mask"].bool()
        assert (clf.tokens(resume).x[real] - clf.tokens(inputs).x[real]).abs().max() < 1e-5


def test_fp16_overflow_is_refused_with_the_way_out(tmp_path):
    clf = _classifier("vit", [_lora_from("vit", 1, 3)])
    with torch.no_grad():
        clf.backbone.patch_embed.proj.weight.mul_(1e5)
    loader = DataLoader(TensorDataset(torch.randn(2, 3, 32, 32), torch.zeros(2)), batch_size=2)
    with pytest.raises(DepthCacheRefused, match="bf16 or fp32"):
        write_rows(clf, loader, 1, "fp16", tmp_path)


def test_cache_entries_are_atomic_and_unreadable_ones_rewritten(tmp_path, capsys):
    clf = _classifier("vit", [_lora_from("vit", 1, 3)])
    loader = DataLoader(TensorDataset(torch.randn(3, 3, 32, 32), torch.arange(3)), batch_size=2)
    cache = DepthCache(tmp_path / "c")
    write = lambda folder: write_rows(clf, loader, 1, "fp16", folder)  # noqa: E731
    rows = cache.get_or_build("k1", write, n=3)
    assert (cache.hits, cache.misses) == (0, 1) and len(rows) == 3
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert len(cache.get_or_build("k1", write, n=3)) == 3 and cache.hits == 1
    tokens = tmp_path / "c" / "k1" / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])  # truncated
    again = cache.get_or_build("k1", write, n=3)
    assert "unreadable" in capsys.readouterr().err and cache.misses == 2
    assert torch.equal(again[2]["tokens"], rows[2]["tokens"])


def test_cached_loader_draws_like_the_original_loader():
    ds = TensorDataset(torch.arange(10))

    class Rows(torch.utils.data.Dataset):
        meta = {"block": 1, "grid": None, "input_ndim": 2, "pad": [None], "n_rest": 1, "masked": False}

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"tokens": torch.full((2, 4), float(i)), "rest0": torch.tensor(i)}

    original = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    torch.manual_seed(5)
    want = [b[0].tolist() for b in original]
    torch.manual_seed(5)
    got = [y.tolist() for _, y in cached_loader(Rows(), like=original)]
    assert got == want and len(got) == 2


# ------------------------------------------------------------------------------- Lightning fit
def _fit(tmp_path, mode, methods, epochs=1, seed=0):
    import lightning as L

    from shared.data import SyntheticDataModule
    from shared.module import ClassificationModule

    L.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(kind="image", num_classes=2, per_class=10, shape=(3, 32, 32), batch_size=4)
    m = ClassificationModule(backbone="tiny-vit", backbone_kwargs={"depth": 3}, methods=methods, num_classes=2,
                             depth_cache=mode, depth_cache_dir=str(tmp_path / "cache"))
    t = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path), devices=1,
                  accelerator="cpu")
    m.configure_callbacks = lambda: []
    t.fit(m, datamodule=dm)
    return m, {k: float(v) for k, v in t.callback_metrics.items()}, dm


def test_fit_trains_from_the_cache_as_the_normal_path_does(tmp_path):
    lora = [{"name": "lora", "r": 4, "targets": r"blocks\.(1|2)\.attn\.qkv"}]
    _, normal, _ = _fit(tmp_path, "off", lora, epochs=2)
    m, cached, dm = _fit(tmp_path, "fp32", lora, epochs=2)
    assert m.depth_cache_status["active"] and m.depth_cache_status["written"] and m.depth_cache_status["block"] == 1
    assert cached.keys() == normal.keys()
    for k in normal:  # fp32 storage, the same seed: the same shuffles and steps
        assert cached[k] == pytest.approx(normal[k], abs=1e-5), k
    assert "train_dataloader" not in dm.__dict__  # the data module is left as it was
    m2, _, _ = _fit(tmp_path, "fp32", lora, seed=1)  # another seed: the same cache
    assert not m2.depth_cache_status["written"] and m2.depth_cache_status["path"] == m.depth_cache_status["path"]


def test_fit_falls_back_with_one_warning_line(tmp_path, capsys):
    m, metrics, dm = _fit(tmp_path, "auto", [{"name": "full"}])
    err = [line for line in capsys.readouterr().err.splitlines() if "depth_cache" in line]
    assert len(err) == 1 and "outside the transformer blocks" in err[0] and "normal path" in err[0]
    assert m.depth_cache_status["active"] is False and "train/loss" in metrics
    assert not (tmp_path / "cache").exists()


def test_depth_cache_option_is_validated_and_shown_in_help():
    from jsonargparse import ArgumentParser

    from shared.module import ClassificationModule

    with pytest.raises(ValueError, match="model.depth_cache"):
        ClassificationModule(backbone="tiny-vit", depth_cache="fp8")
    p = ArgumentParser()
    p.add_class_arguments(ClassificationModule, "model")
    text = p.format_help()
    assert "--model.depth_cache" in text and "'bf16'" in text and "--model.depth_cache_dir" in text
    assert p.parse_args(["--model.depth_cache", "off"]).model.depth_cache == "off"
    assert ClassificationModule(backbone="tiny-vit", depth_cache=False).hparams.depth_cache is False  # YAML `off`


def test_resume_moves_devices_only():
    r = Resume(1, torch.zeros(2, 3, 4, dtype=torch.float16), torch.ones(2, 3, dtype=torch.long), (1, 2), 4)
    moved = r.to("cpu", non_blocking=True)
    assert moved.tokens.dtype == torch.float16 and moved.mask.dtype == torch.long and moved.ndim == 4
    assert len(moved) == 2
    with pytest.raises(TypeError):
        r.to(torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_path_on_gpu_equals_normal_path():
    clf = _classifier("vit", [_lora_from("vit", 1, 3)]).cuda()
    x = _inputs("vit").cuda()
    with torch.no_grad():
        ref = clf(x)
        got = clf(clf.anatomy.tokens_entering(1, x).to("cuda"))
    assert (got - ref).abs().max().item() < 1e-4
