"""The PEFT core: method configs, attach / summary / merge, and adapter bundles.

    from shared import peft
    model = peft.attach(backbone, [peft.Adapter(placement="ffn", mode="parallel", bottleneck=64),
                                   peft.LoRA(r=8, alpha=16, targets=["qkv"])])
    peft.summary(model); peft.save(model, "runs/x/adapter"); peft.load(fresh, "runs/x/adapter")
"""
from shared.artifacts import BundleError, from_bundle, load, read_meta, save

from .adapters import Adapter, Compacter, FiLM
from .bank import AdapterBank
from .base import METHODS, Method, PeftState, from_dict, register, state_of
from .core import Classifier, attach, fingerprint, merge, recompute, regularization, split, start, step, summary, weightless_copy
from .fused import QKVLoRA
from .hyper import HyperAdapter, Polyhistor, PolyhistorLite, add_task, use_task
from .lora import IA3, AdaLoRA, DoRA, LoHa, LoKr, LoRA, VeRA
from .scaling import BitFit, Full, NormTuning
from .tokens import Prefix, Prompt

__all__ = [
    "METHODS", "Method", "PeftState", "register", "from_dict", "state_of",
    "attach", "summary", "merge", "recompute", "start", "step", "weightless_copy", "regularization", "save", "load", "from_bundle", "read_meta", "fingerprint", "split",
    "Classifier", "BundleError", "AdapterBank",
    "LoRA", "DoRA", "AdaLoRA", "IA3", "LoHa", "LoKr", "VeRA", "QKVLoRA",
    "Adapter", "Compacter", "FiLM", "HyperAdapter", "Polyhistor", "PolyhistorLite", "use_task", "add_task", "Prompt", "Prefix", "BitFit", "NormTuning", "Full",
]
