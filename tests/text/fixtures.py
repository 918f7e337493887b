"""Fixtures in the real on-disk layouts: ACTER 1.5 (IOB tsv + unique term lists) and
PersonalizedJargon annotation CSV / JSONL."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from text.data import REQUIRED

ACTER_SENTENCES = {
    "corp": [[("The", "O"), ("bribery", "B"), ("case", "O"), ("involved", "O"), ("money", "B"), ("laundering", "I"), (".", "O")],
             [("Anti", "B"), ("-", "I"), ("corruption", "I"), ("laws", "I"), ("apply", "O"), (".", "O")]],
    "equi": [[("The", "O"), ("rider", "B"), ("performed", "O"), ("a", "O"), ("half", "B"), ("pass", "I"), (".", "O")]],
    "htfl": [[("Heart", "B"), ("failure", "I"), ("patients", "B"), ("received", "O"), ("diuretics", "B"), (".", "O")],
             [("Ejection", "B"), ("fraction", "I"), ("was", "O"), ("low", "O"), (".", "O")]],
    "wind": [[("Wind", "B"), ("turbines", "I"), ("need", "O"), ("blades", "B"), (".", "O")]],
}
ACTER_TERMS = {"htfl": [("heart failure", "Specific_Term"), ("patients", "Common_Term"), ("diuretics", "Specific_Term"),
                        ("ejection fraction", "Specific_Term"), ("nyha class", "Specific_Term")]}


def write_acter(root: Path) -> Path:
    for dom, sentences in ACTER_SENTENCES.items():
        base = root / "en" / dom / "annotated" / "annotations"
        for i, s in enumerate(sentences):  # one file per sentence, as ACTER's per-text files
            f = base / "sequential_annotations" / "iob_annotations" / "without_named_entities" / f"{dom}_en_{i + 1:02d}_seq_terms.tsv"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(f"{w}\t{t}" for w, t in s) + "\n\n")
        terms = ACTER_TERMS.get(dom) or sorted({(" ".join(w for w, t in s[a:b]).lower(), "Specific_Term")
                                               for s in sentences for a, b in _spans(s)})
        lists = base / "unique_annotation_lists"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{dom}_en_terms.tsv").write_text("".join(f"{t}\t{lab}\n" for t, lab in terms))
        # ACTER 1.5's tokenised version (terms as space-separated tokens), the reference match's gold list
        (lists / f"{dom}_en_tokenised_terms.tsv").write_text("".join(f"{t}\t{lab}\n" for t, lab in terms))
    return root


def _spans(s):
    out, start = [], None
    for i, (_, t) in enumerate(s + [("", "O")]):
        if t != "I" and start is not None:
            out.append((start, i))
            start = None
        if t == "B":
            start = i
    return out


ABSTRACTS = {
    "p1": "We measure implied volatility with option pricing models and a survey of traders.",
    "p2": "The ribosome and apoptosis are studied in a large data set of cells.",
    "p3": "Tort liability and habeas corpus shape the statute in this survey.",
}
ROWS = [  # (reader, paper, entity, familiarity)
    ("1", "p1", "implied volatility", 1), ("1", "p1", "option pricing models", 2), ("1", "p1", "survey", 5),
    ("1", "p2", "ribosome", 5), ("1", "p2", "apoptosis", 4), ("1", "p2", "data set", 5),
    ("1", "p3", "tort liability", 1), ("1", "p3", "habeas corpus", 1), ("1", "p3", "statute", 3),
    ("2", "p1", "implied volatility", 5), ("2", "p1", "option pricing models", 4), ("2", "p1", "survey", 5),
    ("2", "p2", "ribosome", 1), ("2", "p2", "apoptosis", 1), ("2", "p2", "data set", 4),
    ("2", "p3", "tort liability", 2), ("2", "p3", "habeas corpus", 1), ("2", "p3", "statute", 1),
]
COLUMNS = list(REQUIRED) + ["s2fieldofstudy", "domain", "number_of_papers", "first_paper_year",
                            "additional_definition", "additional_background", "additional_example"]


def write_annotations(path: Path, rows=ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for reader, paper, entity, fam in rows:
            w.writerow({"entity": entity, "paper_sha": paper, "abstract": ABSTRACTS[paper], "familiarity": fam,
                        "annotator": reader, "s2fieldofstudy": "X", "domain": {"1": "biology", "2": "finance"}[reader],
                        "number_of_papers": 10, "first_paper_year": 2015, "additional_definition": int(fam <= 2),
                        "additional_background": int(fam == 1), "additional_example": 0})
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
