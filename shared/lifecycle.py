"""A training run's claim on its output folder, and how a run stops.

Every training CLI writes through an `OutputRun`:

- the lock `.NAME.lock` beside `--output_dir` (an `flock`, held for the whole run and removed on exit): a second
  run into the same folder refuses with one line naming the folder and the pid that holds it (`OutputBusy`);
- the staging folder `.NAME.staging-XXXX` beside it, where the run writes everything; it replaces the output
  folder in one step only when the run has finished (`publish`), so a failed or stopped run leaves the previous
  results as they were. `.owner.json` inside it records the owner (pid, host, process start, command);
- leftovers: on the next run into the same folder, staging folders whose owner process is gone are removed,
  except the one `--resume` continues; a live process's folder is never removed;
- SIGTERM (what schedulers send) and SIGINT (Ctrl-C) raise `RunStopped` (exit status 143 / 130); inside a
  Lightning `fit` / `test` (`deferred_stop`) the stop waits for Lightning's next batch boundary, where every
  DDP rank stops together, so no checkpoint is half written. A stopped run keeps its staging folder when it
  can be resumed (it has a checkpoint), and says so in one line.

DDP: only the launching process (global rank 0) takes the lock and creates the staging folder; the ranks
Lightning starts re-run the CLI and find the folder in the environment (`STAGE_ENV`).
This module imports neither torch nor Lightning (the lock must be cheap to take).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from shared.fs import atomic_write, replace_dir

STAGE_ENV = "PEFT_SUITE_STAGE_DIR"  # the staging folder, inherited by the DDP ranks the launcher starts
OWNER = ".owner.json"
LAST = "last.ckpt"  # the checkpoint `--resume` continues from


class OutputBusy(ValueError):
    """Another live run holds the output folder's lock."""


class NothingToResume(ValueError):
    """`--resume` was asked for, but no stopped run of this output folder can be continued."""


class RunStopped(BaseException):
    """The run was stopped by a signal; the exit status is 128 + the signal number (143 SIGTERM, 130 SIGINT).
    A BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(message or f"stopped by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# --------------------------------------------------------------------------------------------- signals
_installer_pid: int | None = None
_deferred: list = []  # the Lightning trainers whose fit / test is running now (innermost last)
_pending: list[int] = []  # the signal a deferred stop waits on


def _handler(signum, frame) -> None:
    if os.getpid() != _installer_pid:  # a forked child (a DataLoader worker): the default behaviour
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _deferred and not _pending:
        # Lightning's own SIGTERM handler (which calls this one after it) has marked the trainer; a SIGINT
        # marks it the same way. The trainer stops at its next batch boundary (all DDP ranks together).
        _pending.append(signum)
        connector = getattr(_deferred[-1], "_signal_connector", None)
        if connector is not None:
            connector.received_sigterm = True
        print(f"{signal.Signals(signum).name} received: stopping after the current batch "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)
        return
    raise RunStopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise RunStopped inside this block (main thread only; elsewhere a no-op)."""
    global _installer_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    outer_pid, _installer_pid = _installer_pid, os.getpid()
    for s in previous:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _installer_pid = outer_pid


@contextlib.contextmanager
def deferred_stop(trainer) -> Iterator[None]:
    """Around `trainer.fit` / `trainer.test`: a stop signal lets Lightning finish the current batch, then
    raises RunStopped. Lightning ends a SIGTERM'd loop with SIGTERMException (a SystemExit, status 0): that
    is turned into RunStopped here too."""
    _deferred.append(trainer)
    try:
        yield
    except SystemExit as e:
        signum = _pending[0] if _pending else (signal.SIGTERM if type(e).__name__ == "SIGTERMException" else None)
        if signum is None:
            raise
        raise RunStopped(signum) from None
    finally:
        _deferred.pop()
        pending = _pending[:]
        _pending.clear()
    if pending:  # the signal came during the last batch: the loop ended normally, the run stops here
        raise RunStopped(pending[0])


# ----------------------------------------------------------------------------------------- processes
def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_record(command: str | None = None) -> dict:
    """Who this process is: pid, host, boot, start ticks, wall-clock start and the command line."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(), "start_ticks": _start_ticks(os.getpid()),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command or command_line()}


def owner_alive(rec: dict) -> bool | None:
    """True / False whether the recorded process still runs; None when it ran on another host."""
    if rec.get("host") != socket.gethostname():
        return None
    if rec.get("boot_id") and _boot_id() and rec["boot_id"] != _boot_id():
        return False  # the machine rebooted since
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_ticks(pid)
    if rec.get("start_ticks") is not None and now is not None and now != rec["start_ticks"]:
        return False  # the pid was reused by another process
    return True


def launch_rank() -> int:
    """The global rank a launcher (torchrun, SLURM, Lightning's DDP) gave this process; 0 when none."""
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        v = os.environ.get(var)
        if v and v.isdigit():
            if var == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
                continue
            return int(v)
    return 0


def program(argv0: str | None = None) -> str:
    """How the user started us: `python -m audio.train` rather than `.../audio/train.py`."""
    p = Path(sys.argv[0] if argv0 is None else argv0)
    if p.suffix == ".py" and (p.parent / "__init__.py").is_file():
        return f"python -m {p.parent.name}" if p.stem == "__main__" else f"python -m {p.parent.name}.{p.stem}"
    return f"python {p}" if p.suffix == ".py" else p.name


def command_line(argv: list[str] | None = None) -> str:
    """The whole command, e.g. `python -m audio.train --config x.yaml`."""
    argv = sys.argv if argv is None else argv
    return " ".join([program(argv[0] if argv else "python"), *map(shlex.quote, argv[1:])])


def resume_command(flag: str = "--resume", argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    return command_line([a for a in argv if a != flag] + [flag])


# ------------------------------------------------------------------------------------------ the lock
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class _Lock:
    """An exclusive, non-blocking flock on `path`; the holder's record is written into it. The holder removes
    the file before releasing it; a taker checks that the file it locked is still the one at `path`."""

    def __init__(self, path: Path, record: dict):
        import fcntl

        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise BlockingIOError(_read_json(path)) from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


# ------------------------------------------------------------------------------------- the output run
def staging_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f".{out.name}.staging-*") if p.is_dir())


class OutputRun:
    """One run's claim on `out` (see the module docstring).

    `resume`: continue the newest stopped run of `out` (its staging folder and `LAST` checkpoint); refuses with
    NothingToResume when there is none ("if-any": starts afresh then). `resumable`: whether this CLI can resume at all (else a stopped run's
    staging folder is removed like a failed one's). `flag`: the CLI's resume flag, for the messages.
    """

    def __init__(self, out: str | os.PathLike, *, resume: bool = False, resumable: bool = True,
                 flag: str = "--resume", argv: list[str] | None = None, say: Callable[[str], None] | None = None):
        self.out, self.resume, self.resumable, self.flag = Path(out), resume, resumable, flag
        self.argv = list(sys.argv if argv is None else argv)
        self.say = say or (lambda line: print(line, flush=True))
        self.stage: Path | None = None
        self.resume_from: Path | None = None  # LAST in the resumed staging folder
        self.worker = False  # a DDP rank > 0: writes nothing, owns nothing
        self._lock: _Lock | None = None
        self._set_env = False
        self._published = False
        self._closed = False

    @property
    def lock_path(self) -> Path:
        return self.out.with_name(f".{self.out.name}.lock")

    # -- opening
    def open(self) -> Path:
        """Take the lock, clear the leftovers, create (or take over, for --resume) the staging folder."""
        inherited = os.environ.get(STAGE_ENV)
        if inherited:  # a rank the launcher started: its staging folder and lock are the launcher's
            self.worker, self.stage = True, Path(inherited)
            if self.resume and (self.stage / LAST).exists():
                self.resume_from = self.stage / LAST
            return self.stage
        if launch_rank() > 0:  # a rank started by torchrun / srun: rank 0 owns the folder; find what it uses
            self.worker = True
            stale = self._resumable(self._stale())
            self.stage = stale[0] if self.resume and stale else self.out.with_name(f".{self.out.name}.staging-rank{launch_rank()}")
            self.resume_from = self.stage / LAST if self.resume and stale else None
            return self.stage
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{self.out}: is a file; --output_dir names a folder")
        record = process_record(command_line(self.argv))
        try:
            self._lock = _Lock(self.lock_path, record)
        except BlockingIOError as e:
            holder = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
            who = (f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                   if holder.get("pid") else f"the process holding {self.lock_path}")
            raise OutputBusy(f"{self.out}: another run is writing into this output folder ({who}); wait for it to "
                             f"end, stop it, or choose another output folder") from None
        try:
            stale = self._stale()
            if self.resume:
                candidates = self._resumable(stale)
                if candidates:
                    self.stage, self.resume_from = candidates[0], candidates[0] / LAST
                elif self.resume != "if-any":
                    raise NothingToResume(
                        f"{self.out}: nothing to resume: no stopped run of this output folder left a checkpoint "
                        f"({self.out.parent}/.{self.out.name}.staging-*/{LAST}); run without {self.flag} to start afresh")
            self._remove_leftovers([p for p in stale if p != self.stage])
            if self.stage is None:
                self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.staging-", dir=self.out.parent))
            atomic_write(self.stage / OWNER, json.dumps(record, indent=1))
            if self.resume_from is not None:
                self.say(f"resuming the stopped run in {self.stage} from its {LAST}")
        except BaseException:
            self._release()
            raise
        os.environ[STAGE_ENV] = str(self.stage)
        self._set_env = True
        return self.stage

    def _stale(self) -> list[Path]:
        """Staging folders of `out` whose owner is not running (newest first); live ones are left alone."""
        stale = []
        for p in staging_folders(self.out):
            rec = _read_json(p / OWNER)
            # this process's own earlier run (stopped, e.g. in a notebook) is over: we hold the lock now
            mine = rec.get("pid") == os.getpid() and rec.get("host") == socket.gethostname()
            alive = owner_alive(rec) if rec and not mine else False
            if alive:
                continue
            if alive is None:  # another host: cannot tell; the lock we hold says no run of ours uses it
                self.say(f"note: {p} belongs to pid {rec.get('pid')} on {rec.get('host')}; kept (remove it by hand "
                         f"if that run has ended, or continue it with {self.flag})")
                if not (p / LAST).exists():
                    continue
            stale.append(p)
        return sorted(stale, key=lambda p: _mtime(p / LAST, p), reverse=True)

    def _resumable(self, stale: list[Path]) -> list[Path]:
        return [p for p in stale if (p / LAST).exists()]

    def _remove_leftovers(self, paths: list[Path]) -> None:
        removed = []
        for p in paths:
            rec = _read_json(p / OWNER)
            if rec and owner_alive(rec) is None:
                continue  # another host's: only --resume takes it over
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        if removed:
            self.say(f"removed {len(removed)} staging folder(s) of stopped or crashed runs beside {self.out}: "
                     f"{', '.join(removed)}")

    # -- closing
    def publish(self) -> None:
        """The run has finished: its staging folder becomes `out` (the previous contents go, in one step)."""
        if self.worker:
            return
        (self.stage / OWNER).unlink(missing_ok=True)
        last = self.stage / LAST  # a resume point only (a folder for a sharded checkpoint); best.ckpt stays
        shutil.rmtree(last) if last.is_dir() else last.unlink(missing_ok=True)
        replace_dir(self.stage, self.out)
        self._published = True

    def close(self, error: BaseException | None = None) -> None:
        """End the claim. A stopped run that can be resumed keeps its staging folder (and `error` gets the one
        line that says how to continue); any other unfinished run's staging folder is removed. A failed resumed
        run keeps the folder it took over: it is still resumable with the right command."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.worker and isinstance(error, RunStopped):
                error.args = ("",)  # rank 0 reports the stop, once
            if self.worker or self.stage is None or self._published:
                return
            keep = False
            if isinstance(error, RunStopped):
                keep = self.resumable and (self.stage / LAST).exists()
                if keep:
                    line = (f"stopped by {error.name}: {self.out} was left as it was; the stopped run is kept in "
                            f"{self.stage} (its {LAST}); continue it with: {resume_command(self.flag, self.argv)}")
                else:
                    why = ("it had not saved a checkpoint yet" if self.resumable
                           else "this command starts afresh: run it again")
                    line = f"stopped by {error.name}: {self.out} was left as it was; nothing of the stopped run was kept ({why})"
                error.args = (line,)
                with contextlib.suppress(OSError):
                    if keep:
                        with open(self.stage / "train.log", "a") as fh:
                            fh.write(line + "\n")
            elif error is not None and self.resume_from is not None:
                keep = True
                print(f"note: the stopped run stays in {self.stage}; {self.flag} with the command that started it "
                      f"continues it", file=sys.stderr)
            if not keep:
                shutil.rmtree(self.stage, ignore_errors=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._set_env:
            os.environ.pop(STAGE_ENV, None)
            self._set_env = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "OutputRun":
        self.open()
        return self

    def __exit__(self, et, e, tb) -> None:
        self.close(e)


def _mtime(*paths: Path) -> float:
    for p in paths:
        with contextlib.suppress(OSError):
            return p.stat().st_mtime
    return 0.0


def stopped_message(e: RunStopped) -> str:
    """The one line a CLI prints for a stop outside any OutputRun (e.g. while parsing)."""
    msg = str(e)
    return msg if msg != f"stopped by {e.name}" else f"stopped by {e.name} before the run wrote anything"


def report_stop(e: RunStopped) -> int:
    """Print a stop's one line on stderr (a DDP rank other than 0 prints nothing) and return its exit status."""
    line = stopped_message(e)
    if line:
        print(line, file=sys.stderr, flush=True)
    return e.exit_code
