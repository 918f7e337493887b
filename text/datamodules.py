"""Lightning data modules: `JargonDataModule` (PersonalizedJargon CSV or the JSONL layout) and
`ActerDataModule` (ACTER 1.5 cross-domain term extraction, TermEval 2020 protocol)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from text import data as D
from text.tagger import TERM_MATCH, Window, WindowEncoder, build_tokenizer, collate, term_keyer


class TextDataModule(L.LightningDataModule):
    """Common part: the tokenizer, windows of `max_length` tokens with `overlap` words, batching."""

    task = "jargon"
    extra_columns: list[str] = []  # additional-information columns trained as extra targets (jargon layouts)

    def __init__(self, tokenizer: dict[str, Any] | None = None, max_length: int = 128, overlap: int = 16,
                 batch_size: int = 16, reader_prefix: bool = True, seed: int = 0):
        super().__init__()
        self.tokenizer_cfg = dict(tokenizer or {"kind": "hash", "vocab_size": 1024})
        self.max_length, self.overlap, self.batch_size, self.seed = max_length, overlap, batch_size, seed
        self.reader_prefix = reader_prefix
        self.splits: dict[str, list[D.Doc]] = {}
        self._encoder = None
        # per evaluated split: (doc index of each window in the docs' order, the loader's order of them)
        self.eval_plan: dict[str, tuple[list[tuple[int, Window]], list[int]]] = {}

    @property
    def encoder(self) -> WindowEncoder:
        if self._encoder is None:
            self._encoder = WindowEncoder(build_tokenizer(self.tokenizer_cfg), self.max_length, self.overlap,
                                          self.reader_prefix)
        return self._encoder

    labels = D.TAGS
    num_classes = 3

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_cfg, "max_length": self.max_length, "overlap": self.overlap,
                "reader_prefix": self.reader_prefix, "task": self.task, **self.extra_preprocessing()}

    def extra_preprocessing(self) -> dict[str, Any]:
        return {}

    def docs(self, stage: str) -> list[D.Doc]:
        if not self.splits:
            self.setup("fit")
        return self.splits[stage]

    def windows(self, stage: str) -> list[Window]:
        return [w for _, w in self._jobs(stage)]

    def _jobs(self, stage: str) -> list[tuple[int, Window]]:
        cols = self.extra_columns
        return [(i, w) for i, d in enumerate(self.docs(stage))
                for w in self.encoder.encode(d.words, d.profile, d.word_tags(), d.extra_tags(cols) if cols else None)]

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        pad = self.encoder.tok.pad_id
        if shuffle:
            windows = self.windows(stage)
        else:
            # Evaluation: windows in order of length, so a batch pads to about its own length; the model
            # scores the docs from these batches' outputs (`eval_plan`: back to the docs' order).
            jobs = self._jobs(stage)
            order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][1].input_ids))
            self.eval_plan[stage] = (jobs, order)
            windows = [jobs[i][1] for i in order]
        return DataLoader(windows, batch_size=self.batch_size, shuffle=shuffle, collate_fn=lambda ws: collate(ws, pad))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val" if self.docs("val") else "test", False)

    def test_dataloader(self):
        return self._loader("test", False)


class JargonDataModule(TextDataModule):
    """Per-reader jargon decisions.

    Args:
        root: a PersonalizedJargon annotation CSV, a JSONL file (`{"reader", "abstract", "terms",
            "jargon"}` per line), or a folder holding `annotations.csv` / `annotations.jsonl`.
        threshold: jargon = familiarity at or below it (the study: 1).
        split: "abstract" (the same readers, unseen abstracts) or "reader" (unseen readers).
        test / val: fractions of the abstracts (or readers), or their ids.
        label_fraction: keep this share of each reader's training labels (the study's 10% regime: 0.1).
        missing_entities: "error" or "skip" an entity that is not in its abstract.
        extra_targets: additional-information labels learnt and scored as extra targets, any of
            `definition`, `background`, `example` (the columns `additional_definition`, ...; CSV layout
            only). Entities without that label add no loss. Default: none.
    """

    def __init__(self, root: str = "runs/text_demo/data", threshold: float = 1, split: str = "abstract",
                 test: float | list[str] = 0.2, val: float | list[str] = 0.1, label_fraction: float = 1.0,
                 missing_entities: str = "error", extra_targets: list[str] | None = None, **kw):
        super().__init__(**kw)
        self.extra_columns = D.target_columns(extra_targets)
        self.root, self.threshold, self.split = root, threshold, split
        self.test, self.val, self.label_fraction, self.missing_entities = test, val, label_fraction, missing_entities
        self.readers: dict[str, dict[str, Any]] = {}

    @property
    def name(self) -> str:
        return f"jargon-{Path(self.root).stem}"

    @property
    def metric_definition(self) -> str:
        """"reference" (the study: jargon = familiarity <= 1), or the threshold used instead."""
        return "reference" if float(self.threshold) == 1 else f"jargon_threshold={self.threshold:g}"

    @property
    def protocol(self) -> str:
        names = "/".join(D.target_name(c) for c in self.extra_columns)
        extra = f"; extra targets {names}" if names else ""
        return f"split by {self.split}; labels {self.label_fraction:g}{extra}"

    def path(self) -> Path:
        p = Path(self.root)
        if p.is_dir():
            for n in ("annotations.csv", "annotations.jsonl"):
                if (p / n).is_file():
                    return p / n
            raise D.DataError(f"{p}: holds no annotations.csv or annotations.jsonl (data.root)")
        return p

    def read(self) -> tuple[list[D.Doc], dict[str, dict[str, Any]]]:
        p = self.path()
        if p.suffix == ".jsonl":
            if self.extra_columns:
                raise D.DataError(f"{p}: the JSONL layout has no additional-information labels; data.extra_targets "
                                  f"needs the PersonalizedJargon CSV (columns {self.extra_columns})")
            return D.read_jsonl(p)
        return D.read_annotations(p, self.threshold, self.missing_entities, self.extra_columns)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        docs, self.readers = self.read()
        self.splits = D.split_docs(docs, self.split, self.test, self.val, self.seed)
        if self.label_fraction < 1:
            D.keep_label_fraction(self.splits["train"], self.label_fraction, self.seed)

    def extra_preprocessing(self) -> dict[str, Any]:
        if not self.readers:
            self.setup("fit")
        out = {"threshold": self.threshold,
               "readers": {r: D.reader_profile(r, m) for r, m in sorted(self.readers.items())}}
        if self.extra_columns:
            out["extra_targets"] = [D.target_name(c) for c in self.extra_columns]
        return out


class ActerDataModule(TextDataModule):
    """ACTER 1.5, English: train on the other domains' sentences, test on `test_domain` (TermEval 2020:
    train corp / equi / wind, test htfl). Validation: `val_fraction` of each training domain's files.

    Args:
        root: the ACTER folder (holds `en/<domain>/annotated`).
        test_domain: corp | equi | htfl | wind.
        train_domains: default: the three others.
        named_entities: the annotation version with named entities as terms.
        max_train_sentences / max_test_sentences: seeded subsamples for short CPU runs (0 = all). With
            all test sentences the gold list is the domain's unique term list (TermEval); with a
            subsample, the terms annotated in those sentences.
        term_match: how predicted terms meet the gold list (docs/metrics.md): "reference" (TermEval:
            exact lowercased, ACTER-normalised strings, against the tokenised unique list, the one
            that matches the tokens the tagger labels), "original_list" (the same match against the
            untokenised list TermEval 2020 scored), "term_key" (this suite's former match:
            punctuation split off, untokenised list).
        bootstrap: resamples of the test sentences for the 95% percentile intervals of precision /
            recall / F1 written beside them (`test/f1_lo`, `test/f1_hi`, ...; `text.bootstrap`,
            seeded with `seed`); 0: none.
    """

    task = "terms"

    def __init__(self, root: str = "../shared/data/acter", test_domain: str = "htfl",
                 train_domains: list[str] | None = None, named_entities: bool = False, val_fraction: float = 0.1,
                 max_train_sentences: int = 0, max_test_sentences: int = 0, term_match: str = "reference",
                 bootstrap: int = 1000, **kw):
        kw.setdefault("reader_prefix", False)
        if term_match not in TERM_MATCH:
            raise D.DataError(f"data.term_match must be one of {list(TERM_MATCH)}, got {term_match!r}")
        super().__init__(**kw)
        self.term_match, self.term_key = term_match, term_keyer(term_match)
        self.root, self.test_domain, self.named_entities = root, test_domain, named_entities
        self.train_domains = list(train_domains or [d for d in D.ACTER_DOMAINS if d != test_domain])
        if test_domain in self.train_domains:
            raise D.DataError(f"data.test_domain {test_domain!r} is also a training domain")
        self.val_fraction, self.max_train, self.max_test = val_fraction, max_train_sentences, max_test_sentences
        if bootstrap < 0:
            raise D.DataError(f"data.bootstrap must be >= 0 (resamples; 0 = no intervals), got {bootstrap}")
        self.bootstrap = int(bootstrap)
        self.gold: set[str] = set()

    @property
    def name(self) -> str:
        return f"acter-{self.test_domain}"

    @property
    def protocol(self) -> str:
        return f"termeval: train {'+'.join(self.train_domains)}, test {self.test_domain}" + \
            (" (with NEs)" if self.named_entities else "")

    @property
    def metric_definition(self) -> str:
        return "reference" if self.term_match == "reference" else f"term_match={self.term_match}"

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rng = random.Random(self.seed)
        train, val = [], []
        for dom in self.train_domains:
            files = D.acter_files(self.root, dom, self.named_entities)
            files = rng.sample(files, len(files))
            n_val = round(self.val_fraction * len(files))
            for i, f in enumerate(files):
                (val if i < n_val else train).extend(D.read_acter_file(f, dom))
        test = [d for f in D.acter_files(self.root, self.test_domain, self.named_entities)
                for d in D.read_acter_file(f, self.test_domain)]
        if self.max_train and len(train) > self.max_train:
            train = rng.sample(train, self.max_train)
        if self.max_train and len(val) > max(1, self.max_train // 5):
            val = rng.sample(val, max(1, self.max_train // 5))
        if self.max_test and len(test) > self.max_test:
            test = rng.sample(test, self.max_test)
            self.gold = set().union(*(D.doc_terms(d, key=self.term_key) for d in test))
        else:
            self.gold = set(D.acter_gold_terms(self.root, self.test_domain, self.named_entities,
                                               tokenised=self.term_match == "reference", key=self.term_key))
        self.splits = {"train": train, "val": val, "test": test}

    def gold_terms(self, stage: str) -> set[str]:
        if stage == "test":
            return self.gold
        return set().union(*(D.doc_terms(d, key=self.term_key) for d in self.docs(stage)))
