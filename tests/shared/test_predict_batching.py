"""shared.predict (issue 22 item 2): the one batching loop of the four predict CLIs: input order, a
bad file named as soon as it is decoded and skipped while the rest of its batch is predicted, a
batch whose forward fails for one input retried file by file, nothing lost when decoding crashes,
and the defaults of --batch-size / --workers."""
from __future__ import annotations

import argparse
import functools

import pytest
import torch

from shared import predict as P


class Bad(ValueError):
    pass


def _load(x: int, bad=(), alone=(), warn=()):
    if x in bad:
        raise Bad(f"file {x}: unreadable")
    if x == 99:
        raise RuntimeError("decoder crashed")
    return P.Loaded(x, warnings=(f"file {x}: odd",) if x in warn else (), alone=x in alone)


def _run_recording(calls):
    def run(batch):
        calls.append(list(batch))
        return [10 * x for x in batch]
    return run


@pytest.mark.parametrize("workers", [0, 2])
def test_results_in_input_order_errors_at_once_and_batches_filled(workers):
    calls, warned = [], []
    items = list(range(1, 11))
    load = functools.partial(_load, bad=(3, 8), alone=(6,), warn=(2,))
    got = list(P.predict_batches(items, load, _run_recording(calls), batch_size=3, workers=workers,
                                 errors=(Bad,), warn=warned.append))
    # file 3's error comes when it is decoded: before the results of files 1-2 (their batch is not full yet)
    kinds = [("err", str(g)) if isinstance(g, Bad) else g for g in got]
    assert kinds == [("err", "file 3: unreadable"), (1, 10), (2, 20), (4, 40), (5, 50), (6, 60),
                     ("err", "file 8: unreadable"), (7, 70), (9, 90), (10, 100)]
    # batches of 3 decoded files; the volume-like file 6 alone (the batch before it is run first)
    assert calls == [[1, 2, 4], [5], [6], [7, 9, 10]]
    assert warned == ["file 2: odd"]


def test_a_batch_that_fails_for_one_input_is_retried_file_by_file():
    calls = []

    def run(batch):
        calls.append(list(batch))
        if 4 in batch:
            raise Bad("file 4: a 3D volume for a 2D bundle")
        return [-x for x in batch]

    got = list(P.predict_batches([1, 2, 4, 5], _load, run, batch_size=4, workers=0, errors=(Bad,)))
    assert [g if not isinstance(g, Bad) else str(g) for g in got] == [(1, -1), (2, -2), "file 4: a 3D volume for a 2D bundle",
                                                                    (5, -5)]
    assert calls == [[1, 2, 4, 5], [1], [2], [4], [5]]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_crash_while_decoding_keeps_the_files_decoded_before_it(workers):
    got = []
    with pytest.raises(RuntimeError, match="decoder crashed"):
        got.extend(P.predict_batches([1, 2, 99, 4], _load, lambda b: list(b), batch_size=8, workers=workers))
    assert got == [(1, 1), (2, 2)]  # was in the batch being filled: predicted before the error is raised


def test_an_unexpected_error_in_the_forward_raises():
    def run(batch):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(P.predict_batches([1, 2], _load, run, batch_size=2, workers=0, errors=(Bad,)))


def test_stacked_groups_equal_shapes_and_keeps_the_order():
    xs = [torch.full((2,), 1.0), torch.full((3,), 2.0), torch.full((2,), 3.0)]
    seen = []

    def forward(b):
        seen.append(tuple(b.shape))
        return {"sum": b.sum(-1), "x2": b * 2}

    out = P.stacked(xs, forward)
    assert seen == [(2, 2), (1, 3)]
    assert [float(o["sum"]) for o in out] == [2.0, 6.0, 6.0]
    assert torch.equal(out[1]["x2"], torch.full((3,), 4.0))


def test_defaults_follow_the_machine(monkeypatch):
    assert [P.default_workers(n) for n in (1, 2, 3, 5, 16)] == [0, 1, 2, 4, 4]
    assert P.default_batch_size() == P.default_batch_size("cpu") == 16
    assert P.default_batch_size("cuda") == 64
    ap = argparse.ArgumentParser()
    P.add_arguments(ap)
    monkeypatch.setattr(P, "cpu_count", lambda: 1)
    assert P.resolve(ap.parse_args([])) == (16, 0)  # a one-core machine decodes in the main process
    monkeypatch.setattr(P, "cpu_count", lambda: 8)
    assert P.resolve(ap.parse_args([])) == (16, 4)
    assert P.resolve(ap.parse_args(["--batch-size", "1", "--workers", "0"])) == (1, 0)
    for bad in (["--batch-size", "0"], ["--workers", "-1"], ["--batch-size", "x"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)
