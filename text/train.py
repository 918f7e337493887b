"""`python -m text.train`: personalised jargon detection (encoder path: BIO tagger + PEFT).

With no arguments: an offline demo on a small synthetic corpus in the PersonalizedJargon layout
with SIMULATED readers of different backgrounds, a tiny BERT of RANDOM weights and LoRA; prints
per-reader F1. With recipes:

    python -m text.train --config domains/text/acter_minilm_lora.yaml --data.root ../shared/data/acter
    python -m text.train --config domains/text/jargon_minilm_lora.yaml --data.root annotations.csv
"""
from __future__ import annotations

import sys
from pathlib import Path

from shared.cli import domain_main, friendly
from text.module import TaggerModule

RECIPES = Path(__file__).resolve().parent.parent / "domains" / "text"
DEMO = RECIPES / "demo.yaml"


def describe(model, data) -> None:
    emb = model.model.backbone.config.vocab_size
    if data.encoder.tok.vocab_size > emb:
        raise ValueError(f"data.tokenizer has {data.encoder.tok.vocab_size} ids but the backbone embeds {emb}: set "
                         f"model.backbone_kwargs.vocab_size (tiny-bert) or use the backbone's own tokenizer")
    limit = model.model.backbone.config.max_position_embeddings
    if data.max_length > limit:
        raise ValueError(f"data.max_length={data.max_length} exceeds the backbone's {limit} positions")
    bb, kw = model.hparams.backbone, model.hparams.backbone_kwargs or {}
    note = " with RANDOM weights (demo / tests; no pretrained knowledge)" if bb.startswith("tiny-") else ""
    print(f"backbone: {bb} {kw}{note}")
    sizes = {s: len(data.docs(s)) for s in ("train", "val", "test")}
    print(f"data: {data.name} ({data.protocol}); documents {sizes}")


def run_facts(model) -> dict:
    """After testing: torch's intra-op thread count (CPU times of runs with different counts do not
    compare) and the validation score of the tested (best) checkpoint (what a learning-rate grid
    chooses on). The run's CPU time is `cpu_seconds`, written by `shared.cli`."""
    import torch

    out = {"torch_threads": torch.get_num_threads()}
    best = [c.best_model_score for c in model.trainer.checkpoint_callbacks
            if getattr(c, "best_model_score", None) is not None]
    if best:
        out[f"{model.monitor}_best"] = float(best[0])
    return out


def write_test_terms(model) -> None:
    """ACTER runs: the terms predicted in each test sentence and the gold terms that occur in it
    (`TaggerModule.test_terms`) go to the run folder as `test_terms.json`, so `text.report` can
    compare two runs on the same resampled sentences (`text.bootstrap.term_difference`)."""
    import json

    from shared.fs import atomic_write

    terms = getattr(model, "test_terms", None)
    if terms and model.trainer.is_global_zero:
        atomic_write(Path(model.trainer.default_root_dir) / "test_terms.json", json.dumps(terms))


def print_readers(model, data) -> dict:
    """After testing: the per-reader F1 table (jargon layouts), and the run's facts (`run_facts`)."""
    facts = run_facts(model)
    write_test_terms(model)
    if data.task != "jargon":
        return facts
    m = model.evaluate("test")
    per = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("f1_reader/")}
    if per:
        print("per-reader test F1 (jargon class): " + ", ".join(f"{r} {v:.3f}" for r, v in per.items())
              + f"; macro {m['macro_f1']:.3f}")
    return facts


def main(argv: list[str] | None = None) -> dict:
    from shared.cli import is_demo
    from text.synthetic import write_demo_data

    if is_demo(sys.argv[1:] if argv is None else argv):
        import torch

        torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads; they only contend

    return domain_main(argv, DEMO, write_demo_data,
                       "a synthetic corpus in the PersonalizedJargon layout with simulated readers",
                       model_class=TaggerModule, describe=describe, evaluate=print_readers)


if __name__ == "__main__":
    sys.exit(friendly(main))
