"""`python -m text.predict --adapter BUNDLE [--reader R] "abstract text"`: the terms an adapter marks
as jargon for a reader (or as terms, for an ACTER-trained tagger), with their scores.

    python -m text.predict --adapter runs/text_demo/tagger_lora/adapter --reader r1 "We study the ribosome ..."
    python -m text.predict --adapter ... --reader r1 --term ribosome --term "data set" "We study the ribosome ..."

Tagger bundles (python -m text.train): without --term the tagger finds the spans itself; with --term
it decides each given term (each must occur in the text). A text longer than the model's context is
windowed, never truncated. A hyphenated compound ("difference-in-differences", "state-level") is
one word of a span, and a span of function words only ("in", "of the") is never reported. A
term-extraction bundle (ACTER, preprocessing.task "terms") prints "term" where a jargon bundle
prints "jargon".

The text is the last argument, or @FILE for a UTF-8 file's contents (a folder, a missing file or
another encoding is refused, naming it); text that is the name of an existing file is taken as
text, with a warning ("did you mean @FILE?"). Several texts (or @FILEs) may be given: they are
read and split into words by --workers processes while the model runs, the windows of --batch-size
texts share forwards (--batch-size windows each), and each text's results, headed by its name
(FILE, or "text N"), are printed as its batch is done; a text that cannot be used is named on
stderr, the others are still predicted, and the exit code is 2.

Generative bundles (python -m text.personalise): --adapter is the run's output folder (its readers'
bundles under adapters/readers/) or one bundle; the reader's LoRA answers the study's yes / no
question for each term and the yes-no log-probability margin is printed (jargon when > 0). Without
--term the candidates are the runs of content words of the text (up to 3 words, no stop words).
--profile with an unknown reader asks the shared adapter with that reader line.

    python -m text.predict --adapter runs/text_personalise/demo --reader r1 --term ribosome "We study the ribosome ..."
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch

from shared import peft
from shared.cli import friendly, stream_results
from shared.hub import resolve_adapter
from shared.predict import add_arguments, predict_batches, resolve
from text import module as _registers  # noqa: F401  (hf-encoder backbone, token head)
from text.data import target_name
from text.tagger import WindowEncoder, build_tokenizer, decode_terms, num_tags, span_score, word_outputs
from text.words import find_all, split_words


class JargonTagger:
    """A loaded tagger bundle: `tag(text, reader=..., terms=...)` -> [{term, score, jargon}]."""

    def __init__(self, bundle: str | Path):
        meta = peft.read_meta(bundle)
        if meta.get("domain") != "text" or meta.get("task") != "jargon-tagging":
            raise ValueError(f"{bundle}: not a text tagger bundle (task {meta.get('task')!r}, domain "
                             f"{meta.get('domain')!r}); train one with python -m text.train")
        self.meta, self.prep = meta, meta.get("preprocessing") or {}
        self.model = peft.from_bundle(bundle).eval()
        self.encoder = WindowEncoder(build_tokenizer(self.prep.get("tokenizer")), self.prep.get("max_length", 128),
                                     self.prep.get("overlap", 16), self.prep.get("reader_prefix", False))
        self.readers: dict[str, str] = self.prep.get("readers") or {}
        # what a marked span is: a term (a term-extraction bundle, e.g. ACTER) or jargon for a reader
        self.marks = "terms" if self.prep.get("task") == "terms" else "jargon"

    @property
    def personalised(self) -> bool:
        return bool(self.encoder.reader_prefix and self.readers)

    def profile(self, reader: str | None, profile: str | None = None) -> str:
        if profile:
            return profile
        if not self.personalised:
            if reader is not None:
                raise ValueError("this adapter is not personalised (trained without reader profiles); drop --reader")
            return ""
        if reader is None:
            raise ValueError(f"this adapter is personalised: pass --reader (one of {', '.join(self.readers)}) "
                             f"or --profile 'reader X; background Y'")
        if reader not in self.readers:
            raise ValueError(f"unknown reader {reader!r}; this adapter knows {', '.join(self.readers)} "
                             f"(or describe a new reader with --profile)")
        return self.readers[reader]

    def tag(self, text: str, reader: str | None = None, terms: list[str] | None = None,
            profile: str | None = None, threshold: float = 0.5) -> list[dict[str, Any]]:
        prepared = self.prepare(text, terms)
        prof = self.profile(reader, profile)
        with torch.inference_mode():
            outputs = word_outputs(self.model, self.encoder, [(prepared["words"], prof)])[0]
        return self.rows_of(prepared, outputs, threshold)

    def tag_many(self, prepared: list[dict[str, Any]], profile: str, threshold: float = 0.5,
                 batch_size: int = 32) -> list[list[dict[str, Any]]]:
        """`rows_of` for several prepared texts, their windows `batch_size` per forward (a long
        text's windows and the next text's share a forward)."""
        with torch.inference_mode():
            outputs = word_outputs(self.model, self.encoder, [(d["words"], profile) for d in prepared], batch_size)
        return [self.rows_of(d, o, threshold) for d, o in zip(prepared, outputs)]

    @staticmethod
    def prepare(text: str, terms: list[str] | None = None) -> dict[str, Any]:
        """The text's words and, for given `terms`, where each occurs: ValueError for an empty text
        or a term that does not occur (no model needed: this runs while the files are decoded)."""
        if not text or not text.strip():
            raise ValueError("empty abstract: nothing to tag")
        tokens = split_words(text)
        words = [w.text for w in tokens]
        found = None
        if terms is not None:
            found = []
            for t in terms:
                phrase = [w.text for w in split_words(t)]
                starts = find_all(words, phrase)
                if not phrase or not starts:
                    raise ValueError(f"term {t!r} does not occur in the abstract")
                found.append((t, len(phrase), starts))
        return {"tokens": tokens, "words": words, "terms": found}

    def rows_of(self, prepared: dict[str, Any], outputs, threshold: float = 0.5) -> list[dict[str, Any]]:
        """[{term, start, end, score, jargon}] of a prepared text from its (n_words, C + K) outputs."""
        c = num_tags(self.model)
        probs, extra = outputs[:, :c], outputs[:, c:]
        if prepared["terms"] is None:
            rows = [{**s, "jargon": s["score"] >= threshold} for s in decode_terms(prepared["tokens"], probs)]
        else:
            rows = []
            for t, n, starts in prepared["terms"]:
                best = max(((i, i + n) for i in starts), key=lambda sp: span_score(probs, sp))
                s = span_score(probs, best)  # = entity_score over all occurrences
                rows.append({"term": t, "start": best[0], "end": best[1], "score": s, "jargon": s >= threshold})
        targets = [target_name(col) for col in getattr(self.model.head, "extra_targets", [])]
        for r in rows if targets else []:  # additional-information targets: mean probability over the term's words
            r["extra"] = {t: float(extra[r["start"]:r["end"], k].mean()) for k, t in enumerate(targets)}
        return rows


class GenerativeJargon:
    """A generative run's reader adapters (a `python -m text.personalise` output folder, or one
    bundle): `score(text, reader, terms)` -> [{term, score (yes-no margin), jargon}]."""

    def __init__(self, adapter: str | Path):
        from text import generative as G
        from text import prompts

        self.G, self.prompts = G, prompts
        root = Path(adapter)
        self.bundles: dict[str, Path] = {}  # reader -> bundle folder
        self.profiles: dict[str, str] = {}
        self.shared: Path | None = None
        if (root / "adapters").is_dir():
            for meta_path in sorted((root / "adapters" / "readers").glob("*/adapter.json")):
                meta = peft.read_meta(meta_path.parent)
                self._check(meta, meta_path.parent)
                self.bundles[meta["reader"]] = meta_path.parent
                self.profiles.update((meta.get("preprocessing") or {}).get("readers") or {})
            if (root / "adapters" / "shared" / "adapter.json").is_file():
                self.shared = root / "adapters" / "shared"
            if not self.bundles and self.shared is None:
                raise ValueError(f"{root / 'adapters'}: no reader bundles (adapters/readers/<reader>/adapter.json)")
        else:
            meta = peft.read_meta(root)
            self._check(meta, root)
            if meta["reader"] == G.SHARED:
                self.shared = root
            else:
                self.bundles[meta["reader"]] = root
            self.profiles.update((meta.get("preprocessing") or {}).get("readers") or {})
        self.loaded: tuple[Path, Any] | None = None

    def _check(self, meta: dict[str, Any], where: Path) -> None:
        if meta.get("task") != self.G.TASK or "reader" not in meta:
            raise ValueError(f"{where}: not a generative jargon bundle (task {meta.get('task')!r}); train one with "
                             f"python -m text.personalise")

    @property
    def readers(self) -> list[str]:
        return sorted(self.bundles)

    def resolve(self, reader: str | None, profile: str | None = None) -> tuple[Path, str, str]:
        """(bundle, reader id, reader line) of a known reader, or of the shared adapter for --profile."""
        known = ", ".join(self.readers) or "none"
        if reader is not None and reader in self.bundles:
            return self.bundles[reader], reader, profile or self.profiles.get(reader, f"reader {reader}")
        if profile:
            if self.shared is None:
                raise ValueError(f"--profile for a reader without an adapter needs the shared adapter (adapters/shared); "
                                 f"this adapter knows {known}")
            return self.shared, reader or "new", profile
        if reader is None:
            raise ValueError(f"this adapter is personalised: pass --reader (one of {known}) or --profile "
                             f"'reader X; background Y' (answered by the shared adapter)")
        raise ValueError(f"unknown reader {reader!r}; this adapter knows {known}"
                         + (" (or describe a new reader with --profile)" if self.shared is not None else ""))

    def scorer(self, bundle: Path):
        if self.loaded is None or self.loaded[0] != bundle:
            scorer, _ = self.G.load_bundle(bundle)
            self.loaded = (bundle, scorer)
        return self.loaded[1]

    def score(self, text: str, reader: str | None = None, terms: list[str] | None = None,
              profile: str | None = None, threshold: float = 0.0) -> list[dict[str, Any]]:
        if not text or not text.strip():
            raise ValueError("empty abstract: nothing to score")
        bundle, who, line = self.resolve(reader, profile)
        words = [w.text for w in split_words(text)]
        if terms is None:
            terms = self.prompts.candidate_terms(text)
        for t in terms:
            if not find_all(words, [w.text for w in split_words(t)]):
                raise ValueError(f"term {t!r} does not occur in the abstract")
        queries = [self.prompts.Query(who, line, text.strip(), t) for t in terms]
        margins = self.scorer(bundle).score_shared([(q, True) for q in queries])
        return [{"term": t, "score": m, "jargon": m > threshold} for t, m in zip(terms, margins)]


def is_generative(adapter: str | Path) -> bool:
    """A text.personalise output folder, or a bundle whose task is the generative yes / no path."""
    from text.generative import TASK

    root = Path(adapter)
    if (root / "adapters").is_dir() and not (root / "adapter.json").is_file():
        return True
    try:
        return peft.read_meta(root).get("task") == TASK
    except ValueError:
        return False  # the tagger path reports the problem


def abstract_text(arg: str, warn: bool = True) -> str:
    """The abstract the command line gives: the text itself, or with @FILE the contents of a UTF-8
    file. A bad @FILE raises ValueError naming it (missing, a folder, not UTF-8, unreadable); text
    that is the name of an existing file is still taken as the text, with a one-line warning
    (unless `warn` is False)."""
    if arg.startswith("@"):
        p = Path(arg[1:])
        if p.is_dir():
            raise ValueError(f"{p}: is a folder; @FILE reads the abstract from one text file")
        if not p.is_file():
            raise ValueError(f"{p}: file not found (@FILE reads the abstract from that file)")
        try:
            return p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None
        except OSError as e:
            raise ValueError(f"{p}: cannot read ({e.strerror or e})") from None
    if warn and arg.strip() and "\n" not in arg and len(arg) < 4096:
        try:
            exists = Path(arg.strip()).exists()
        except (OSError, ValueError):  # e.g. a name too long for the file system: text
            exists = False
        if exists:
            print(f"warning: {arg.strip()!r} is the name of an existing {'folder' if Path(arg.strip()).is_dir() else 'file'}, "
                  f"taken here as the abstract's text (did you mean @{arg.strip()}?)", file=sys.stderr, flush=True)
    return arg


def quiet_transformers() -> None:
    """No transformers load report (e.g. the unused pooler of a sentence encoder) or progress bars in
    predict's output: the bundle's own checks (backbone fingerprint, tensor names) already refuse a
    wrong model."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def load_text(item: tuple[str | None, str], terms: list[str] | None = None, generative: bool = False) -> dict[str, Any]:
    """One (name, argument)'s text, read (@FILE) and split into words (tagger) with its --term
    occurrences found, while the model runs; ValueError naming the text (its file, or "text N"
    when several texts are given)."""
    name, arg = item
    try:
        text = abstract_text(arg, warn=False)  # main() has warned about a file name given as text
        if not generative:
            return {"name": name, **JargonTagger.prepare(text, terms)}
        if not text or not text.strip():
            raise ValueError("empty abstract: nothing to score")
        words = [w.text for w in split_words(text)]
        for t in terms or []:
            if not find_all(words, [w.text for w in split_words(t)]):
                raise ValueError(f"term {t!r} does not occur in the abstract")
        return {"name": name, "text": text}
    except ValueError as e:
        if name is None or str(e).startswith(f"{name}:"):
            raise
        raise ValueError(f"{name}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m text.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a tagger bundle folder written by python -m text.train, or a "
                                                      "python -m text.personalise output folder / one of its bundles")
    ap.add_argument("--reader", help="the reader id (personalised adapters; see the bundle's preprocessing.readers)")
    ap.add_argument("--profile", help="reader information for a reader the adapter has not seen, e.g. "
                                      "'reader new; background biology'")
    ap.add_argument("--term", action="append", dest="terms", metavar="TERM",
                    help="a candidate term to decide (repeat it; each must occur in every text)")
    ap.add_argument("--threshold", type=float, help="tagger: score at or above which a term is jargon (0.5); "
                                                    "generative: yes-no margin above which a term is jargon (0)")
    ap.add_argument("--all", action="store_true", help="print every candidate, not only those marked as jargon")
    add_arguments(ap, "texts")
    ap.add_argument("text", nargs="+", help="the abstract (quote it), or @FILE to read it from a file; several "
                                            "texts: each one's results are headed by its name (FILE, or text N)")
    args = ap.parse_args(argv)
    several = len(args.text) > 1
    items, failed = [], 0
    for k, arg in enumerate(args.text, 1):
        name = (arg[1:] if arg.startswith("@") else f"text {k}") if several else None
        try:
            abstract_text(arg)  # a bad @FILE is named before the bundle loads; the text itself is read by load_text
        except ValueError as e:
            if not several:
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        items.append((name, arg))
    if not items:
        return 2
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers and forked decoding workers
    args.adapter = resolve_adapter(args.adapter)  # a folder, catalogue name or reference; a typo names the closest
    generative = is_generative(args.adapter)
    if generative:
        threshold = 0.0 if args.threshold is None else args.threshold
        scorer = GenerativeJargon(args.adapter)
        scorer.resolve(args.reader, args.profile)  # an unknown reader: one error, before any text
        batch_size, workers = resolve(args)

        def run(docs):  # each abstract's prompts share one forward of its head: one abstract at a time
            return [scorer.score(d["text"], args.reader, args.terms, args.profile, threshold) for d in docs]

        def show(item) -> None:
            (name, _), rows = item
            who = f" for reader {args.reader}" if args.reader else f" for {args.profile!r}"
            print(f"{name + ': ' if name else ''}{sum(r['jargon'] for r in rows)} of {len(rows)} terms marked as "
                  f"jargon{who} (yes-no log-probability margin > {threshold:g}):")
            for r in rows:
                if args.all or r["jargon"]:
                    print(f"{r['score']:+.3f}\t{'jargon' if r['jargon'] else '-'}\t{r['term']}")
    else:
        threshold = 0.5 if args.threshold is None else args.threshold
        tagger = JargonTagger(args.adapter)
        profile = tagger.profile(args.reader, args.profile)  # an unknown reader: one error, before any text
        batch_size, workers = resolve(args, tagger.model)
        mark = "term" if tagger.marks == "terms" else "jargon"

        def run(docs):  # the windows of every text of the batch, batch_size per forward
            return tagger.tag_many(docs, profile, threshold, batch_size)

        def show(item) -> None:
            (name, _), rows = item
            head = f"{name}: " if name else ""
            n = len([r for r in rows if r["jargon"]])
            if tagger.marks == "terms":  # a term extractor: what it marks are terms, nobody's jargon
                print(f"{head}{n} of {len(rows)} candidate spans marked as terms (score >= {threshold}):")
            else:
                who = f" for reader {args.reader}" if args.reader else ""
                print(f"{head}{n} of {len(rows)} terms marked as jargon{who} (score >= {threshold}):")
            for r in rows:
                if args.all or r["jargon"]:
                    wants = "".join(f"\t{t} {p:.2f}" for t, p in r.get("extra", {}).items())  # extra targets
                    print(f"{r['score']:.3f}\t{mark if r['jargon'] else '-'}\t{r['term']}{wants}")

    load = functools.partial(load_text, terms=args.terms, generative=generative)
    results = predict_batches(items, load, run, batch_size=batch_size, workers=workers, errors=(ValueError,))
    if not several:  # one text: its problem is the command's error (one line, exit 2)
        for item in results:
            if isinstance(item, Exception):
                raise item
            show(item)
        return 0
    return 2 if stream_results(results, show) or failed else 0


def _cli() -> None:
    status = main()
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    sys.exit(friendly(_cli))
