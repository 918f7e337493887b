"""How a training run stops, resumes, cleans up after dead runs and locks its output folder
(shared.lifecycle through shared.cli.run; docs/operations.md)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import shared.cli as cli
from shared.cli import STAGE_ENV, friendly, run
from shared.lifecycle import OWNER, OutputRun, RunStopped, owner_alive, process_record

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "domains" / "demo.yaml"
TINY = ["--trainer.enable_progress_bar", "false", "--data.init_args.per_class", "10", "--trainer.logger", "false"]


@pytest.fixture(autouse=True)
def _no_inherited_stage():
    saved = os.environ.pop(STAGE_ENV, None)
    yield
    os.environ.pop(STAGE_ENV, None)
    if saved is not None:
        os.environ[STAGE_ENV] = saved


def _args(out, epochs=2, *extra):
    return ["--output_dir", str(out), "--trainer.max_epochs", str(epochs), *TINY, *extra]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(STAGE_ENV, None)
    return env


def stop_after_epoch(monkeypatch, epoch: int, signum=signal.SIGTERM):
    """Send `signum` to this process at the end of training epoch `epoch` (1-based), as a scheduler would."""
    line = cli.EpochLine.on_train_epoch_end

    def on_end(self, trainer, pl_module):
        line(self, trainer, pl_module)
        if trainer.current_epoch + 1 == epoch:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(cli.EpochLine, "on_train_epoch_end", on_end)


@pytest.mark.slow  # a fresh interpreter imports torch + Lightning (~15 s here, more under load)
def test_sigterm_exits_143_keeps_previous_outputs_and_the_run_resumes(tmp_path):
    """A real demo run in a subprocess, SIGTERM'd after its first epoch line: status 143, one line that
    says it stopped and how to resume, the previous metrics.json untouched; `--resume` then finishes it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"previous": true}\n')
    cmd = [sys.executable, "-m", "shared.demo", *_args(out, 30)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/30"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert any(line.startswith("epoch 1/30") for line in lines), "".join(lines) + err
    assert proc.returncode == 143, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and f"{out} was left as it was" in stopped[0] and stopped[0].endswith(" --resume")
    assert "Traceback" not in err
    assert (out / "metrics.json").read_text() == '{"previous": true}\n'
    (stage,) = [tmp_path / n for n in _hidden(tmp_path) if n.startswith(".run.staging-")]
    assert (stage / "last.ckpt").is_file() and json.loads((stage / OWNER).read_text())["pid"] == proc.pid
    assert not (tmp_path / ".run.lock").exists()  # released (and removed) on exit

    # the stopped run continues in this process (its owner is gone) and replaces the old results
    row = run(default_config=DEMO, args=_args(out, 2, "--resume"))
    assert json.loads((out / "metrics.json").read_text())["test/acc"] == row["test/acc"]
    log = (out / "train.log").read_text()
    assert "stopped by SIGTERM" in log and "resumed after epoch 1/2 from last.ckpt" in log and "epoch 2/2" in log
    assert _hidden(tmp_path) == [] and not (out / "last.ckpt").exists()


def test_resumed_run_ends_with_the_metrics_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """SIGTERM (a real signal to this process) after epoch 1 of 3: exit status 143, the previous results
    untouched; --resume ends with the test metrics of the uninterrupted run (same shuffles, same best epoch)."""
    logged = ["--trainer.logger", "true"]  # the resumed run logs on into the stopped run's version_0
    whole = run(default_config=DEMO, args=_args(tmp_path / "whole", 3, *logged))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.json").write_text("previous")
    stop_after_epoch(monkeypatch, 1)
    capsys.readouterr()
    assert friendly(run, default_config=DEMO, args=_args(cut, 3, *logged)) == 143
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped by")]
    assert len(err) == 1 and err[0].startswith(f"stopped by SIGTERM: {cut} was left as it was")
    assert "continue it with:" in err[0] and err[0].endswith("--resume")
    assert (cut / "metrics.json").read_text() == "previous"
    with pytest.raises(RunStopped) as e:  # run() itself raises RunStopped
        run(default_config=DEMO, args=_args(tmp_path / "other", 3))
    assert e.value.exit_code == 143
    monkeypatch.undo()
    resumed = run(default_config=DEMO, args=_args(cut, 3, *logged, "--resume"))
    for k in ("test/loss", "test/acc", "test/auroc"):
        assert resumed[k] == pytest.approx(whole[k], abs=1e-6), k
    assert resumed["best_checkpoint"] == whole["best_checkpoint"] == "best.ckpt"
    assert resumed["config"] == whole["config"]  # --resume is not part of the recipe
    assert sorted(p.name for p in (cut / "lightning_logs").iterdir()) == ["version_0"]
    assert (cut / "lightning_logs" / "version_0" / "checkpoints" / "best.ckpt").is_file()
    assert "resuming the stopped run in" in capsys.readouterr().out
    left = _hidden(tmp_path)  # only the other stopped run's folder, kept for its --resume
    assert len(left) == 1 and left[0].startswith(".other.staging-")


def test_sigint_exits_130_through_friendly(tmp_path, monkeypatch, capsys):
    stop_after_epoch(monkeypatch, 1, signal.SIGINT)
    assert friendly(run, default_config=DEMO, args=_args(tmp_path / "run", 3)) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT" in err and "--resume" in err
    assert [n[:13] for n in _hidden(tmp_path)] == [".run.staging-"]


def test_resume_with_nothing_to_resume_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert friendly(run, default_config=DEMO, args=_args(out, 1, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: nothing to resume") and "without --resume" in err[0]
    assert list(tmp_path.iterdir()) == []  # no lock, no staging folder, no output


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_runs_are_removed_live_ones_kept(tmp_path, capsys):
    dead = tmp_path / ".run.staging-dead1"
    dead.mkdir()
    (dead / OWNER).write_text(json.dumps({**process_record(), "pid": _dead_pid(), "start_ticks": None}))
    (dead / "last.ckpt").write_bytes(b"x")
    legacy = tmp_path / ".run.staging-legacy"  # written by a version that kept no owner record
    legacy.mkdir()
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / ".run.staging-live1"
        live.mkdir()
        rec = {**process_record(), "pid": live_proc.pid}
        rec["start_ticks"] = None if rec["start_ticks"] is None else \
            int(Path(f"/proc/{live_proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        (live / OWNER).write_text(json.dumps(rec))
        assert owner_alive(rec) is True and owner_alive({**rec, "pid": _dead_pid()}) is False
        assert owner_alive({**rec, "host": "elsewhere.invalid"}) is None
        run(default_config=DEMO, args=_args(tmp_path / "run", 1))
        assert _hidden(tmp_path) == [".run.staging-live1"]  # the live process's folder is never touched
        assert "removed 2 staging folder(s)" in capsys.readouterr().out
    finally:
        live_proc.kill()
        live_proc.wait()


def test_refused_strategy_or_bad_config_leaves_no_staging_folder_or_lock(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="requires a GPU accelerator"):
        run(default_config=DEMO, args=_args(out, 1, "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"))
    assert list(tmp_path.iterdir()) == []
    assert friendly(run, default_config=DEMO, args=_args(out, 1, "--model.lrr", "1")) == 2
    assert list(tmp_path.iterdir()) == []


HOLDER = textwrap.dedent("""
    import sys, time
    from shared.lifecycle import OutputRun
    claim = OutputRun(sys.argv[1])
    claim.open()
    print("holding", flush=True)
    time.sleep(120)
""")


def test_a_second_run_into_a_locked_output_folder_refuses_naming_the_pid(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert friendly(run, default_config=DEMO, args=_args(out, 1)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: another run is writing into this output folder")
        assert f"pid {holder.pid} " in err[0]
        assert not out.exists() and len(_hidden(tmp_path)) == 2  # the holder's lock and staging folder, untouched
    finally:
        holder.kill()  # SIGKILL: no clean-up at all; the kernel drops the flock
        holder.wait()
    capsys.readouterr()
    run(default_config=DEMO, args=_args(out, 1))  # the lock is free again; the killed run's folder is removed
    assert _hidden(tmp_path) == [] and (out / "metrics.json").is_file()
    assert "removed 1 staging folder(s)" in capsys.readouterr().out


def test_ddp_worker_inherits_the_stage_and_takes_no_lock(tmp_path):
    launcher = OutputRun(tmp_path / "run")
    stage = launcher.open()
    try:
        assert os.environ[STAGE_ENV] == str(stage)
        worker = OutputRun(tmp_path / "run")  # what a DDP rank re-running the CLI does
        assert worker.open() == stage and worker.worker
        worker.publish()
        worker.close(RuntimeError("a rank failed"))
        assert stage.is_dir() and (tmp_path / ".run.lock").is_file()  # the launcher's, left alone
    finally:
        launcher.close()
    assert list(tmp_path.iterdir()) == [] and STAGE_ENV not in os.environ


@pytest.mark.slow
def test_two_cli_processes_into_one_output_folder(tmp_path):
    """Two real CLI runs at once: the first trains, the second refuses at once with exit status 2."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "shared.demo", *_args(out, 30)], cwd=tmp_path, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/30"):
                break
        t0 = time.time()
        second = subprocess.run([sys.executable, "-m", "shared.demo", *_args(out, 1)], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid} " in second.stderr and first.poll() is None
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
        assert first.returncode == 143 and time.time() - t0 < 300
    finally:
        first.kill()
    assert not out.exists()


def test_resume_if_any_starts_afresh_or_takes_over_the_stopped_folder(tmp_path):
    fresh = OutputRun(tmp_path / "run", resume="if-any")  # the vision demo's --resume, per sub-run
    stage = fresh.open()
    assert fresh.resume_from is None and stage.name.startswith(".run.staging-")
    (stage / "last.ckpt").write_bytes(b"x")
    fresh.close(RunStopped(signal.SIGTERM))  # stopped with a checkpoint: kept
    assert stage.is_dir()
    again = OutputRun(tmp_path / "run", resume="if-any")
    assert again.open() == stage and again.resume_from == stage / "last.ckpt"
    again.close(ValueError("a failed resume"))  # keeps the folder it took over
    assert stage.is_dir()
    with pytest.raises(ValueError, match="is a file"):
        (tmp_path / "file").write_text("x")
        OutputRun(tmp_path / "file").open()
