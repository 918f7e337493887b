"""Jargon and term data: the PersonalizedJargon annotation layout, a JSONL layout for new readers,
and ACTER 1.5 (token IOB tags, four domains) for cross-domain term extraction.

Everything becomes `Doc`s: the words of one text, for one reader (or none), with the candidate
entities and their jargon decisions (PersonalizedJargon, JSONL) or gold IOB tags (ACTER).
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from text.words import find_all, split_words, term_key

O, B, I = 0, 1, 2
TAGS = ["O", "B", "I"]
IGNORE = -100

# The study's columns (REFERENCES.md, jargon section); the first five are required.
REQUIRED = ("entity", "paper_sha", "abstract", "familiarity", "annotator")
READER_COLUMNS = ("domain", "number_of_papers", "reference_count", "first_paper_year", "first_cs_paper_year")
EXTRA_TARGETS = ("additional_definition", "additional_background", "additional_example")
# The additional-information labels as extra training targets (`data.extra_targets`): name -> column.
TARGET_COLUMNS = {c.removeprefix("additional_"): c for c in EXTRA_TARGETS}
YES, NO = ("1", "1.0", "true", "yes", "y", "t"), ("0", "0.0", "false", "no", "n", "f")
ACTER_DOMAINS = ("corp", "equi", "htfl", "wind")


@dataclass
class Entity:
    text: str
    spans: list[tuple[int, int]]  # word spans [start, end) of every occurrence in the doc
    jargon: bool | None  # None: label hidden (the few-labels regime) or unknown
    familiarity: float | None = None
    extra: dict[str, bool] = field(default_factory=dict)  # the additional-information labels


@dataclass
class Doc:
    words: list[str]
    doc_id: str  # paper_sha, or file:sentence for ACTER
    reader: str | None = None
    profile: str = ""  # the reader information the models condition on
    entities: list[Entity] = field(default_factory=list)
    tags: list[int] | None = None  # gold word tags (ACTER); else derived from the entities
    domain: str | None = None
    text: str = ""

    def word_tags(self) -> list[int]:
        """Training tags per word: gold IOB tags, or B/I on every occurrence of a jargon entity, O on
        other words, IGNORE on entities whose label is hidden."""
        if self.tags is not None:
            return list(self.tags)
        tags = [O] * len(self.words)
        for e in sorted(self.entities, key=lambda e: e.jargon is True):  # jargon spans win overlaps
            for s, t in e.spans:
                if e.jargon is None:
                    tags[s:t] = [IGNORE] * (t - s)
                elif e.jargon:
                    tags[s:t] = [B] + [I] * (t - s - 1)
                else:
                    tags[s:t] = [O] * (t - s)
        return tags

    def extra_tags(self, columns: list[str] | tuple[str, ...]) -> list[list[float]]:
        """Per word, one training target per additional-information column: 1.0 / 0.0 on every
        occurrence of an entity with that label (1 wins overlaps), NaN elsewhere (no loss)."""
        out = [[float("nan")] * len(columns) for _ in self.words]
        for k, c in enumerate(columns):
            for e in sorted(self.entities, key=lambda e: bool(e.extra.get(c))):
                if c not in e.extra:
                    continue
                for s, t in e.spans:
                    for i in range(s, t):
                        out[i][k] = float(e.extra[c])
        return out


def target_columns(targets: list[str] | tuple[str, ...] | None) -> list[str]:
    """`data.extra_targets` names (definition, background, example, or the full column names) -> the
    annotation columns, in the given order."""
    cols = []
    for t in targets or []:
        c = TARGET_COLUMNS.get(str(t), str(t))
        if c not in EXTRA_TARGETS:
            raise DataError(f"data.extra_targets: unknown target {t!r}; known: {', '.join(TARGET_COLUMNS)}")
        if c in cols:
            raise DataError(f"data.extra_targets: {t!r} is given twice")
        cols.append(c)
    return cols


def target_name(column: str) -> str:
    return column.removeprefix("additional_")


class DataError(ValueError):
    """Bad input data; the message names the file and the row / field."""


def reader_profile(reader: str, meta: dict[str, Any]) -> str:
    """The reader information given to the models (the study's "reader metadata")."""
    parts = [f"reader {reader}"]
    if meta.get("domain"):
        parts.append(f"background {meta['domain']}")
    if meta.get("number_of_papers") not in (None, ""):
        parts.append(f"{meta['number_of_papers']} papers")
    if meta.get("first_paper_year") not in (None, ""):
        parts.append(f"publishing since {meta['first_paper_year']}")
    return "; ".join(parts)


def entity_in(words: list[str], entity: str, where: str) -> list[tuple[int, int]]:
    phrase = [w.text for w in split_words(entity)]
    if not phrase:
        raise DataError(f"{where}: empty entity")
    spans = [(i, i + len(phrase)) for i in find_all(words, phrase)]
    if not spans:
        raise DataError(f"{where}: entity {entity!r} does not occur in its abstract")
    return spans


def _bool(v: str) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "y")


def _yes_no(v: str, where: str) -> bool:
    s = str(v).strip().lower()
    if s in YES or s in NO:
        return s in YES
    raise DataError(f"{where}: {v!r} is not a yes / no value (1 / 0, true / false, yes / no; empty = no label)")


def read_annotations(path: str | Path, threshold: float = 1, missing_entities: str = "error",
                     extra_targets: list[str] | tuple[str, ...] | None = None
                     ) -> tuple[list[Doc], dict[str, dict[str, Any]]]:
    """PersonalizedJargon annotations: one row per reader x abstract x entity. Jargon = familiarity
    at or below `threshold`. Returns the docs (one per reader x abstract) and the readers' metadata.
    `missing_entities`: "error" (default) or "skip" an entity that does not occur in its abstract.
    `extra_targets`: additional-information labels trained as extra targets (`target_columns`):
    their columns are required and their values checked (yes / no, or empty for no label)."""
    columns = target_columns(extra_targets)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    if missing_entities not in ("error", "skip"):
        raise DataError(f"missing_entities must be 'error' or 'skip', got {missing_entities!r}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        absent = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if absent:
            raise DataError(f"{path}: missing column(s) {absent} (the PersonalizedJargon layout needs {list(REQUIRED)})")
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise DataError(f"{path}: missing column(s) {absent} (data.extra_targets "
                            f"{[target_name(c) for c in columns]} reads them)")
        rows = list(reader)
    docs: dict[tuple[str, str], Doc] = {}
    readers: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path} line {n}"
        abstract = (row["abstract"] or "").strip()
        if not abstract:
            raise DataError(f"{where}: empty abstract")
        who = str(row["annotator"]).strip()
        if not who:
            raise DataError(f"{where}: empty annotator")
        try:
            fam = float(row["familiarity"])
        except ValueError:
            raise DataError(f"{where}: familiarity {row['familiarity']!r} is not a number (1-5)") from None
        readers.setdefault(who, {c: row.get(c) for c in READER_COLUMNS if row.get(c) not in (None, "")})
        key = (who, row["paper_sha"])
        if key not in docs:
            words = [w.text for w in split_words(abstract)]
            docs[key] = Doc(words, row["paper_sha"], who, "", domain=row.get("s2fieldofstudy") or None, text=abstract)
        doc = docs[key]
        try:
            spans = entity_in(doc.words, row["entity"], f"{where}, column 'entity'")
        except DataError:
            if missing_entities == "skip":
                continue
            raise
        extra = {c: (_yes_no(row[c], f"{where}, column {c!r}") if c in columns else _bool(row[c]))
                 for c in EXTRA_TARGETS if (row.get(c) or "").strip()}
        doc.entities.append(Entity(row["entity"], spans, fam <= threshold, fam, extra))
    for d in docs.values():
        d.profile = reader_profile(d.reader, readers[d.reader])
    for c in columns:
        if not any(c in e.extra for d in docs.values() for e in d.entities):
            raise DataError(f"{path}: column {c!r} is empty in every row (data.extra_targets needs its labels)")
    return list(docs.values()), readers


def read_jsonl(path: str | Path) -> tuple[list[Doc], dict[str, dict[str, Any]]]:
    """New readers' labels, one JSON object a line:
    {"reader": "r1", "abstract": "...", "terms": ["..."], "jargon": ["..."], "domain"?: "..."}.
    `jargon` is the subset of `terms` that is jargon for the reader."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    docs, readers = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        for k in ("reader", "abstract", "terms", "jargon"):
            if k not in obj:
                raise DataError(f"{where}: missing field {k!r}")
        if not isinstance(obj["terms"], list) or not isinstance(obj["jargon"], list):
            raise DataError(f"{where}: fields 'terms' and 'jargon' must be lists of strings")
        abstract = str(obj["abstract"]).strip()
        if not abstract:
            raise DataError(f"{where}: field 'abstract' is empty")
        unknown = [j for j in obj["jargon"] if j not in obj["terms"]]
        if unknown:
            raise DataError(f"{where}: field 'jargon' lists {unknown[:3]} which are not in 'terms'")
        who = str(obj["reader"])
        readers.setdefault(who, {k: obj[k] for k in READER_COLUMNS if k in obj})
        words = [w.text for w in split_words(abstract)]
        doc_id = obj.get("paper_sha") or hashlib.sha1(abstract.encode()).hexdigest()[:12]
        ents = [Entity(t, entity_in(words, t, f"{where}, field 'terms'"), t in obj["jargon"]) for t in obj["terms"]]
        docs.append(Doc(words, doc_id, who, "", ents, text=abstract))
    if not docs:
        raise DataError(f"{path}: no records")
    for d in docs:
        d.profile = reader_profile(d.reader, readers[d.reader])
    return docs, readers


def read_public_entities(path: str | Path) -> list[dict[str, Any]]:
    """The study's public entity file (`entity_public_for_repo.csv`): abstracts with the 10 candidate
    terms shown to readers (`entity_1`..`entity_10`); no familiarity labels."""
    path = Path(path)
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            for c in ("paper_sha", "abstract", "entity_1"):
                if c not in row:
                    raise DataError(f"{path}: missing column {c!r}")
            terms = [row[f"entity_{i}"].strip() for i in range(1, 11) if (row.get(f"entity_{i}") or "").strip()]
            out.append({"paper_sha": row["paper_sha"], "abstract": row["abstract"].strip(), "terms": terms,
                        "field": row.get("s2fieldsofstudy", ""), "title": row.get("title", "")})
    return out


# ---------------------------------------------------------------- splits and the few-labels regime

def _shuffled(items: list[str], seed: int) -> list[str]:
    items = sorted(set(items))
    random.Random(seed).shuffle(items)
    return items


def split_docs(docs: list[Doc], by: str = "abstract", test: float | list[str] = 0.2, val: float | list[str] = 0.1,
               seed: int = 0) -> dict[str, list[Doc]]:
    """Train / val / test by abstract (the same readers, unseen abstracts) or by reader (unseen
    readers). `test` / `val`: a fraction of the abstracts or readers, or their ids."""
    if by not in ("abstract", "reader"):
        raise DataError(f"split must be 'abstract' or 'reader', got {by!r}")
    key = (lambda d: d.doc_id) if by == "abstract" else (lambda d: d.reader)
    ids = _shuffled([key(d) for d in docs], seed)

    def pick(spec, pool, name):
        if isinstance(spec, (list, tuple)):
            unknown = sorted(set(map(str, spec)) - set(ids))
            if unknown:
                raise DataError(f"{name}: unknown {by} id(s) {unknown[:5]}; known: {ids[:10]}")
            return [str(s) for s in spec]
        n = max(1, round(float(spec) * len(ids))) if spec else 0
        return pool[:n]

    test_ids = pick(test, ids, f"test_{by}s")
    rest = [i for i in ids if i not in test_ids]
    val_ids = pick(val, rest, f"val_{by}s")
    out = {"train": [], "val": [], "test": []}
    for d in docs:
        k = key(d)
        out["test" if k in test_ids else "val" if k in val_ids else "train"].append(d)
    for s in ("train", "test"):
        if not out[s]:
            raise DataError(f"the {by} split leaves no {s} documents ({len(ids)} {by}s in all)")
    return out


def keep_label_fraction(docs: list[Doc], fraction: float, seed: int = 0) -> int:
    """The few-labels regime: hide all but `fraction` of each reader's entity labels (at least one per
    reader), in place; a hidden entity's additional-information labels are hidden too. Hidden
    entities add no loss. Returns how many labels are kept."""
    if not 0 < fraction <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {fraction}")
    kept = 0
    by_reader: dict[str | None, list[Entity]] = {}
    for d in docs:
        by_reader.setdefault(d.reader, []).extend(e for e in d.entities if e.jargon is not None)
    rng = random.Random(seed)
    for ents in by_reader.values():
        k = max(1, round(fraction * len(ents)))
        keep = set(map(id, rng.sample(ents, min(k, len(ents)))))
        for e in ents:
            if id(e) not in keep:
                e.jargon, e.extra = None, {}  # the additional-information labels are hidden with it
        kept += min(k, len(ents))
    return kept


# ---------------------------------------------------------------------------------------- ACTER

def acter_dir(root: str | Path, domain: str) -> Path:
    if domain not in ACTER_DOMAINS:
        raise DataError(f"unknown ACTER domain {domain!r}; the English corpus has {list(ACTER_DOMAINS)}")
    d = Path(root) / "en" / domain / "annotated" / "annotations"
    if not d.is_dir():
        raise DataError(f"{d}: not found (data.root must be the ACTER folder that holds en/<domain>/annotated)")
    return d


def acter_files(root: str | Path, domain: str, named_entities: bool = False) -> list[Path]:
    sub = "with_named_entities" if named_entities else "without_named_entities"
    d = acter_dir(root, domain) / "sequential_annotations" / "iob_annotations" / sub
    files = sorted(d.glob("*.tsv"))
    if not files:
        raise DataError(f"{d}: no *.tsv IOB files")
    return files


def read_acter_file(path: Path, domain: str) -> list[Doc]:
    """One sequential-annotation file: `token<TAB>tag` lines, sentences separated by blank lines."""
    docs, words, tags = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], start=1):
        if not line.strip():
            if words:
                docs.append(Doc(words, f"{path.name}:{len(docs)}", tags=tags, domain=domain, text=" ".join(words)))
            words, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or parts[1].strip() not in ("B", "I", "O"):
            raise DataError(f"{path} line {n}: expected 'token<TAB>B|I|O', got {line!r}")
        words.append(parts[0])
        tags.append(TAGS.index(parts[1].strip()))
    return docs


def acter_gold_terms(root: str | Path, domain: str, named_entities: bool = False, tokenised: bool = False,
                     key=term_key) -> dict[str, str]:
    """The domain's unique term list {key(term): Specific_Term | Common_Term | OOD_Term | Named_Entity}:
    `{domain}_en_terms[_nes].tsv`, or with `tokenised` the `..._tokenised_terms[_nes].tsv` version
    (the terms that align with the tokens of the sequential annotations, tokens joined by spaces)."""
    name = f"{domain}_en{'_tokenised' if tokenised else ''}_terms{'_nes' if named_entities else ''}.tsv"
    path = acter_dir(root, domain) / "unique_annotation_lists" / name
    if not path.is_file():
        raise DataError(f"{path}: not found" + (" (ACTER 1.5 has it; for an older ACTER use data.term_match: "
                                                "original_list)" if tokenised else ""))
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{path} line {n}: expected 'term<TAB>label'")
            out[key(parts[0])] = parts[1].strip()
    return out


def spans_of(tags: list[int]) -> list[tuple[int, int]]:
    """Word spans [start, end) of an IOB sequence (an I after O starts a span, as conlleval)."""
    spans, start = [], None
    for i, t in enumerate(list(tags) + [O]):
        if t == B or (t == I and start is None) or t == O:
            if start is not None:
                spans.append((start, i))
                start = None
            if t in (B, I):
                start = i
    return spans


def doc_terms(doc: Doc, tags: list[int] | None = None, key=term_key) -> set[str]:
    """The unique terms of `tags` (default: the doc's gold tags): each span's words joined by spaces, then `key`."""
    tags = doc.tags if tags is None else tags
    return {key(" ".join(doc.words[s:t])) for s, t in spans_of(tags)}
