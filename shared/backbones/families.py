"""Anatomy entries for the backbone families we support.

timm `VisionTransformer` (DINOv2, Bird-MAE-style ViTs, register tokens), timm `SwinTransformer`,
transformers `ASTModel`, `WhisperEncoder`, Llama-class decoders and BERT-class encoders.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from shared.heads import Tokens

from .anatomy import Anatomy, Resume, Sublayer, UnsupportedMethod, register_anatomy


def _check_placement(placement: str) -> None:
    if placement not in ("mhsa", "ffn"):
        raise ValueError(f"placement must be 'mhsa' or 'ffn', got {placement!r}")


def _hidden(out):
    """A layer's hidden states (transformers layers may return a tuple with attentions)."""
    return out[0] if isinstance(out, tuple) else out


def _bidirectional_mask(config, x: torch.Tensor, mask: torch.Tensor | None):
    """The attention mask a transformers encoder builds for its layers from a (B, N) mask (or None)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=x, attention_mask=mask)


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------
def _timm_classes():
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, SwinTransformer


class _TimmBlocks(Anatomy):
    """Shared by timm ViT and Swin: pre-LN blocks with attn.qkv/proj and mlp.fc1/fc2.

    ViT blocks scale each sublayer by LayerScale (`ls1` / `ls2`; an Identity when the model has
    none) before the residual add, so that module's output is the sublayer output.
    """

    def sublayer(self, block, placement):
        _check_placement(placement)
        if placement == "mhsa":
            return Sublayer(block.attn.qkv, block.attn.proj, block.norm1, block.attn.proj.out_features,
                            out=getattr(block, "ls1", None))
        return Sublayer(block.mlp.fc1, block.mlp.fc2, block.norm2, block.mlp.fc2.out_features,
                        out=getattr(block, "ls2", None))


@register_anatomy
class ViTAnatomy(_TimmBlocks):
    family = "timm-vit"
    model_classes = (_timm_classes()[0],)

    def blocks(self):
        return list(self.model.blocks)

    def final_norm(self):
        return self.model.norm

    @property
    def num_prefix_tokens(self):
        return int(self.model.num_prefix_tokens)

    def grid(self):
        return tuple(self.model.patch_embed.grid_size)

    def forward_tokens(self, inputs):
        x = self.model.forward_features(inputs)  # (B, N, D), final norm applied
        ph, pw = self.model.patch_embed.patch_size
        grid = (inputs.shape[-2] // ph, inputs.shape[-1] // pw)
        # non-patch tokens = whatever precedes the grid: the prefix, plus kept prompt outputs
        return Tokens(x, x.shape[1] - grid[0] * grid[1], grid)

    def resume_unsupported(self):
        return None

    def resume_context(self, inputs):
        ph, pw = self.model.patch_embed.patch_size
        return {"grid": (inputs.shape[-2] // ph, inputs.shape[-1] // pw)}

    def forward_from(self, resume: Resume) -> Tokens:
        x = self._resume_input(resume)  # (B, N, D)
        rest = self.blocks()[resume.block:]
        if getattr(self.model, "grad_checkpointing", False) and rest and torch.is_grad_enabled():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(rest, x)  # as forward_features does under timm's grad checkpointing
        else:
            for block in rest:
                x = block(x)
        x = self.model.norm(x)
        grid = resume.grid if resume.grid is not None else self.grid()
        return Tokens(x, x.shape[1] - grid[0] * grid[1], grid)

    # prefix tuning
    def attention(self, block):
        return block.attn

    def attention_heads(self, attn):
        return attn.num_heads

    @staticmethod
    def attention_dropout(attn):
        return float(attn.attn_drop.p)

    @staticmethod
    def qkv(attn, x):
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v

    @staticmethod
    def attention_output(attn, ctx, inputs):
        return attn.proj_drop(attn.proj(attn.norm(ctx)))


@register_anatomy
class SwinAnatomy(_TimmBlocks):
    family = "timm-swin"
    model_classes = (_timm_classes()[1],)
    prompt_unsupported = (
        "prompt tokens cannot join Swin's windowed attention: every window attends only within "
        "its own fixed-size patch window and patch merging needs a full grid; use adapters, "
        "LoRA, BitFit or HyperAdapter on Swin"
    )
    prefix_unsupported = (
        "prefix tuning is not defined for Swin's shifted-window attention (relative position "
        "bias and window masks have no slot for extra keys); use adapters or LoRA on Swin"
    )

    def blocks(self):
        return [b for stage in self.model.layers for b in stage.blocks]

    def final_norm(self):
        return self.model.norm

    def forward_tokens(self, inputs):
        x = self.model.forward_features(inputs)  # (B, H, W, C) NHWC, final norm applied
        B, H, W, C = x.shape
        return Tokens(x.reshape(B, H * W, C), 0, (H, W))

    def resume_unsupported(self):
        return None

    def forward_from(self, resume: Resume) -> Tokens:
        """Any block: the rest of its stage's blocks (after the stage's patch merging, which ran
        before it), then the later stages whole (their patch merging included)."""
        x = self._resume_input(resume)  # (B, H, W, C) at the resolution of the block's stage
        place = [(s, j) for s, stage in enumerate(self.model.layers) for j in range(len(stage.blocks))]
        if resume.block < len(place):
            s0, j0 = place[resume.block]
            for block in list(self.model.layers[s0].blocks)[j0:]:
                x = block(x)
            for stage in list(self.model.layers)[s0 + 1:]:
                x = stage(x)
        x = self.model.norm(x)
        B, H, W, C = x.shape
        return Tokens(x.reshape(B, H * W, C), 0, (H, W))


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
def _hf(name: str):
    import transformers

    return getattr(transformers, name)


@register_anatomy
class ASTAnatomy(Anatomy):
    family = "hf-ast"
    model_classes = (_hf("ASTModel"),)

    def blocks(self):
        return list(self.model.layers)

    def sublayer(self, block, placement):
        _check_placement(placement)
        if placement == "mhsa":
            a = block.attention
            return Sublayer(a.q_proj, a.o_proj, block.layernorm_before, a.o_proj.out_features)
        return Sublayer(block.mlp.fc1, block.mlp.fc2, block.layernorm_after, block.mlp.fc2.out_features)

    def final_norm(self):
        return self.model.layernorm

    @property
    def num_prefix_tokens(self):
        return 2  # CLS + distillation

    def grid(self):
        return tuple(self.model.embeddings.get_shape(self.model.config))  # (frequency, time)

    def forward_tokens(self, inputs):
        x = self.model(input_values=inputs).last_hidden_state  # (B, P + F*T, D)
        f, t = self.grid()
        # P = CLS + distillation, or what a prompt method left there (dropped / kept prefix, prompt outputs)
        return Tokens(x, x.shape[1] - f * t, (f, t))

    def resume_unsupported(self):
        return None

    def forward_from(self, resume: Resume) -> Tokens:
        x = self._resume_input(resume)  # (B, P + F*T, D)
        mask = _bidirectional_mask(self.model.config, x, None)  # as ASTModel.forward without a mask
        for layer in self.blocks()[resume.block:]:
            x = _hidden(layer(x, mask))
        x = self.model.layernorm(x)
        f, t = self.grid()
        return Tokens(x, x.shape[1] - f * t, (f, t))

    def attention(self, block):
        return block.attention

    def attention_heads(self, attn):
        return attn.num_attention_heads

    @staticmethod
    def attention_dropout(attn):
        return float(attn.attention_dropout)

    @staticmethod
    def qkv(attn, x):
        shape = (*x.shape[:-1], -1, attn.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    @staticmethod
    def attention_output(attn, ctx, inputs):
        return attn.o_proj(ctx), None


def _whisper_classes():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return (WhisperEncoder,)


@register_anatomy
class WhisperAnatomy(Anatomy):
    """transformers `WhisperEncoder`: two convolutions, fixed sinusoidal positions, pre-LN blocks.

    Input (B, n_mels, 2 x max_source_positions) log-mel features; tokens are the
    max_source_positions time steps, a 1-D axis (grid (T, 1)), with no CLS. Prompts go first in
    the sequence (the positions are added before the blocks, which take the token sequence as
    their first input). The attention scales q by head_dim ** -0.5 before an unscaled product;
    `qkv` returns the unscaled q for `sdpa_with_prefix`, whose default scale is the same.
    """

    family = "hf-whisper-encoder"
    model_classes = _whisper_classes()

    def blocks(self):
        return list(self.model.layers)

    def sublayer(self, block, placement):
        _check_placement(placement)
        if placement == "mhsa":
            a = block.self_attn  # q_proj reads the output of self_attn_layer_norm
            return Sublayer(a.q_proj, a.out_proj, block.self_attn_layer_norm, a.out_proj.out_features)
        return Sublayer(block.fc1, block.fc2, block.final_layer_norm, block.fc2.out_features)

    def final_norm(self):
        return self.model.layer_norm

    def grid(self):
        return (int(self.model.config.max_source_positions), 1)  # (time, 1)

    def forward_tokens(self, inputs):
        x = self.model(input_features=inputs).last_hidden_state  # (B, P + T, D), final norm applied
        t = self.grid()[0]
        return Tokens(x, x.shape[1] - t, (t, 1))  # P: prompt outputs a method kept

    def resume_unsupported(self):
        return None

    def forward_from(self, resume: Resume) -> Tokens:
        x = self._resume_input(resume)  # (B, P + T, D)
        m = self.model
        for layer in self.blocks()[resume.block:]:
            if m.training and m.layerdrop > 0 and torch.rand([]) < m.layerdrop:
                continue  # LayerDrop, as WhisperEncoder.forward skips a layer while training
            x = _hidden(layer(x, None))
        x = m.layer_norm(x)
        t = self.grid()[0]
        return Tokens(x, x.shape[1] - t, (t, 1))

    def attention(self, block):
        return block.self_attn

    def attention_heads(self, attn):
        return attn.num_heads

    @staticmethod
    def attention_dropout(attn):
        return float(attn.dropout)

    @staticmethod
    def qkv(attn, x):
        shape = (*x.shape[:-1], -1, attn.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    @staticmethod
    def attention_output(attn, ctx, inputs):
        return attn.out_proj(ctx), None  # WhisperAttention returns (output, attention weights)


def _base_model(model):
    """`XForCausalLM` / `XForSequenceClassification` keep the transformer in `.model` / `.bert`."""
    for attr in ("model", "bert", "base_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and inner is not model and hasattr(inner, "config"):
            return inner
    return model


def _decoder_classes():
    names = ["LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification",
             "MistralModel", "MistralForCausalLM", "Qwen2Model", "Qwen2ForCausalLM"]
    return tuple(_hf(n) for n in names)


@register_anatomy
class DecoderAnatomy(Anatomy):
    """Llama-class causal decoders (Llama, SmolLM2, Mistral, Qwen2): pre-RMSNorm blocks."""

    family = "hf-decoder"
    model_classes = _decoder_classes()
    prompt_unsupported = (
        "prompt tokens would desynchronise a causal decoder's attention mask, rotary positions "
        "and KV cache; for text decoders use peft's PromptTuningConfig through peft.get_peft_model"
    )
    prefix_unsupported = (
        "prefix tuning for causal decoders lives in the KV cache (peft's PrefixTuningConfig "
        "through peft.get_peft_model); our prefix method covers ViT-style attention only"
    )

    def blocks(self):
        return list(_base_model(self.model).layers)

    def sublayer(self, block, placement):
        _check_placement(placement)
        if placement == "mhsa":
            a = block.self_attn
            return Sublayer(a.q_proj, a.o_proj, block.input_layernorm, a.o_proj.out_features)
        m = block.mlp
        return Sublayer(m.gate_proj, m.down_proj, block.post_attention_layernorm, m.down_proj.out_features)

    def final_norm(self):
        return _base_model(self.model).norm

    def resume_unsupported(self):
        return ("hf-decoder: causal decoders build rotary position embeddings and the causal mask inside "
                "their forward and pass them to every layer; resuming at a block (depth caching) is "
                "implemented for timm ViT / Swin, AST, Whisper encoders and BERT-class encoders")

    def forward_tokens(self, inputs):
        kwargs = dict(inputs) if isinstance(inputs, dict) else {"input_ids": inputs}
        kwargs.setdefault("use_cache", False)  # features only: a KV cache would be built and thrown away
        x = _base_model(self.model)(**kwargs).last_hidden_state  # (B, N, D)
        return Tokens(x, 0, None, kwargs.get("attention_mask"))  # the mask lets pooling skip padding


def _encoder_classes():
    names = ["BertModel", "BertForSequenceClassification", "BertForTokenClassification"]
    return tuple(_hf(n) for n in names)


@register_anatomy
class EncoderAnatomy(Anatomy):
    """BERT-class encoders (BERT, MiniLM): post-LN blocks; the LayerNorm after each sublayer."""

    family = "hf-encoder"
    model_classes = _encoder_classes()
    prompt_unsupported = (
        "BERT-class encoders derive their attention mask and position ids from input_ids, so "
        "tokens inserted between blocks would be masked inconsistently; use peft's "
        "PromptTuningConfig through peft.get_peft_model for text encoders"
    )
    prefix_unsupported = (
        "prefix tuning for text encoders is peft's PrefixTuningConfig (through "
        "peft.get_peft_model); our prefix method covers ViT-style attention only"
    )

    def blocks(self):
        return list(_base_model(self.model).encoder.layer)

    def sublayer(self, block, placement):
        _check_placement(placement)
        if placement == "mhsa":
            a = block.attention
            return Sublayer(a.self.query, a.output.dense, a.output.LayerNorm, a.output.dense.out_features)
        return Sublayer(block.intermediate.dense, block.output.dense, block.output.LayerNorm,
                        block.output.dense.out_features)

    def final_norm(self):
        return None  # post-LN: the last block's output LayerNorm is the final norm

    @property
    def num_prefix_tokens(self):
        return 1  # [CLS]

    def forward_tokens(self, inputs):
        kwargs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
        x = _base_model(self.model)(**kwargs).last_hidden_state
        return Tokens(x, 1, None, kwargs.get("attention_mask"))  # the mask lets pooling skip padding

    def resume_unsupported(self):
        base = _base_model(self.model)
        if getattr(base.config, "is_decoder", False):
            return ("hf-encoder: this BERT-class model is configured as a decoder (causal mask, cache); "
                    "resuming at a block is implemented for bidirectional encoders")
        return None

    def resume_context(self, inputs):
        return {"mask": inputs.get("attention_mask") if isinstance(inputs, dict) else None}

    def forward_from(self, resume: Resume) -> Tokens:
        why = self.resume_unsupported()
        if why:
            raise UnsupportedMethod(why)
        base = _base_model(self.model)
        x = self._resume_input(resume)  # (B, N, D)
        mask = _bidirectional_mask(base.config, x, resume.mask)  # as BertModel.forward builds it
        for layer in self.blocks()[resume.block:]:
            x = _hidden(layer(x, mask, None, encoder_attention_mask=None, cache=None))
        return Tokens(x, 1, None, resume.mask)


def square_grid(n: int) -> tuple[int, int]:
    """A grid for n tokens with no known layout: square when possible, else a 1-D column."""
    s = math.isqrt(n)
    return (s, s) if s * s == n else (n, 1)


