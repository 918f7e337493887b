"""A small synthetic corpus in the PersonalizedJargon annotation layout, with SIMULATED readers:
each reader knows the terms of their own background field(s) (familiarity 4-5) and not the others'
(familiarity 1-2, mostly 1); everyday terms are known to everyone. Used by the offline demo.

The additional-information labels are SIMULATED too (`additional_labels`): a reader mostly wants a
definition of an unknown term from a field far from theirs, background on one from a related field
(biology ~ physics, law ~ finance), an example mostly of far ones, and rarely anything for a term
they know. `additional_example` is left empty (no label) for terms the reader knows, as a survey
that asks for examples only of unknown terms would."""
from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

from shared.fs import atomic_write

FIELDS = {
    "biology": ["mitochondrial membrane", "ribosome", "transcription factor", "phenotype", "allele",
                "apoptosis", "cytokine", "gene expression", "enzyme kinetics", "chromatin"],
    "law": ["tort liability", "habeas corpus", "jurisdiction", "statute", "plaintiff",
            "precedent", "injunction", "due process", "fiduciary duty", "indemnity"],
    "physics": ["quantum entanglement", "boson", "wave function", "entropy", "superconductor",
                "dark matter", "spin orbit coupling", "photon", "lattice vibration", "hamiltonian"],
    "finance": ["implied volatility", "arbitrage", "derivative pricing", "yield curve", "hedge ratio",
                "liquidity premium", "credit spread", "option pricing", "collateral", "equity risk"],
}
EVERYDAY = ["survey", "data set", "experiment", "model", "analysis", "sample"]
FILLER = ["we", "study", "the", "role", "of", "in", "and", "results", "show", "that", "a", "new",
          "approach", "for", "this", "paper", "examines", "how", "with", "effects", "on", "our",
          "findings", "suggest", "between", "using", "large", "evidence"]
# Simulated readers: id -> (background fields, papers, first paper year)
READERS = {"r1": (["biology"], 12, 2015), "r2": (["law"], 30, 2008), "r3": (["physics"], 5, 2019),
           "r4": (["finance"], 18, 2012), "r5": (["biology", "physics"], 40, 2005), "r6": (["law", "finance"], 9, 2017)}
# Related fields: a reader of one knows the other's context, if not its terms.
RELATED = {"biology": "physics", "physics": "biology", "law": "finance", "finance": "law"}
# P(wants a definition / background / an example) by how far the term's field is from the reader's.
WANTS = {"known": (0.05, 0.05, 0.05), "related": (0.15, 0.85, 0.2), "far": (0.9, 0.25, 0.8)}
COLUMNS = ["entity", "paper_sha", "abstract", "s2fieldofstudy", "familiarity", "familiarity_before",
           "additional_definition", "additional_background", "additional_example", "annotator", "domain",
           "number_of_papers", "reference_count", "first_paper_year", "first_cs_paper_year"]


def familiarity(rng: random.Random, known: bool) -> int:
    return rng.choice([4, 5, 5]) if known else rng.choice([1, 1, 1, 2])


def distance(field: str | None, known: list[str]) -> str:
    """known (the reader's field, or an everyday term) / related / far."""
    if field is None or field in known:
        return "known"
    return "related" if any(RELATED.get(k) == field for k in known) else "far"


def additional_labels(rng: random.Random, field: str | None, known: list[str]) -> dict[str, int | str]:
    how = distance(field, known)
    d, b, e = (int(rng.random() < p) for p in WANTS[how])
    return {"additional_definition": d, "additional_background": b, "additional_example": "" if how == "known" else e}


def make_rows(n_abstracts: int = 40, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    extra_rng = random.Random(f"additional-{seed}")  # its own stream: the familiarities stay as they were
    names = list(FIELDS)
    rows = []
    for a in range(n_abstracts):
        fields = rng.sample(names, 2)
        terms = rng.sample(FIELDS[fields[0]], 4) + rng.sample(FIELDS[fields[1]], 3) + rng.sample(EVERYDAY, 2)
        rng.shuffle(terms)
        sentences = []
        for i in range(0, len(terms), 3):
            chunk = terms[i:i + 3]
            words = []
            for t in chunk:
                words += rng.sample(FILLER, rng.randint(2, 5)) + [t]
            sentences.append(" ".join(words + rng.sample(FILLER, 2)).capitalize() + ".")
        abstract = " ".join(sentences)
        sha = hashlib.sha1(f"{seed}-{a}".encode()).hexdigest()
        for reader, (known, papers, first) in READERS.items():
            for t in terms:
                field = next((f for f, ts in FIELDS.items() if t in ts), None)
                fam = familiarity(rng, field is None or field in known)
                if fam <= 1:
                    rng.random()  # a draw earlier versions made here: the demo corpus stays the same
                rows.append({"entity": t, "paper_sha": sha, "abstract": abstract, "s2fieldofstudy": fields[0].title(),
                             "familiarity": fam, "familiarity_before": fam,
                             **additional_labels(extra_rng, field, known),
                             "annotator": reader,
                             "domain": "+".join(known), "number_of_papers": papers, "reference_count": papers * 20,
                             "first_paper_year": first, "first_cs_paper_year": first})
    return rows


def annotations_csv(n_abstracts: int = 40, seed: int = 0) -> str:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(make_rows(n_abstracts, seed))
    return buf.getvalue()


def write_annotations(path: str | Path, n_abstracts: int = 40, seed: int = 0) -> Path:
    """Write `path` (a CSV in the PersonalizedJargon annotation layout); atomic."""
    path = Path(path)
    atomic_write(path, annotations_csv(n_abstracts, seed))
    return path


def write_demo_data(root: str | Path) -> None:
    """The demo corpus in `root` (a folder the demo marked as its own): written if missing, rewritten
    if an earlier version of this module wrote it (its simulated additional-information labels differ;
    the familiarities, and so the default demo, are the same)."""
    path = Path(root) / "annotations.csv"
    text = annotations_csv()
    if not path.is_file() or path.read_bytes() != text.encode():
        atomic_write(path, text)
