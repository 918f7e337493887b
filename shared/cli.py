"""The LightningCLI entry reused by every `<domain>.train`.

`python -m audio.train --config domains/audio/esc50_adapter.yaml --data.root ...`: every CLI
flag is a recipe key. A run trains, tests the best-validation checkpoint, saves the adapter
bundle and a metrics row, and only then moves its outputs into `--output_dir`: a failed or
stopped run never overwrites a previous run's results. The output folder is locked for the
run; SIGTERM / SIGINT stop it (exit 143 / 130) and `--resume` continues it from the `last.ckpt`
its staging folder keeps (`shared.lifecycle`; docs/operations.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI

from shared.distributed import is_sharded, whole
from shared.fs import atomic_write
from shared.lifecycle import STAGE_ENV  # noqa: F401  re-exported: where DDP workers find the staging folder
from shared.lifecycle import LAST, OutputRun, RunStopped, deferred_stop, report_stop, stop_signals
from shared.module import ClassificationModule


class PeftCLI(LightningCLI):
    claim: OutputRun | None = None  # the output claim of the run being set up (read by `run` on failure)

    def add_arguments_to_parser(self, parser):
        from jsonargparse import ActionYesNo

        parser.add_argument("--output_dir", default="runs/demo", help="where the bundle, metrics and logs go")
        parser.add_argument("--run_name", default="", help="name of this run in the results table")
        parser.add_argument("--resume", action=ActionYesNo, default=False,
                            help="continue the stopped run of this --output_dir from the last.ckpt its staging folder "
                                 "kept (same recipe and flags as the stopped run); an error when there is none")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        parser.link_arguments("data.preprocessing", "model.preprocessing", apply_on="instantiate")

    def before_instantiate_classes(self):
        # Everything the run writes goes to a staging folder next to output_dir first, under the output
        # folder's lock. DDP workers re-run this CLI; they inherit the launcher's staging folder (STAGE_ENV).
        claim = OutputRun(self.config["output_dir"], resume=bool(self.config.get("resume")))
        PeftCLI.claim = claim
        self.stage = claim.open()
        self.config["trainer"]["default_root_dir"] = str(self.stage)


def arg_value(argv: list[str], *names: str) -> str | None:
    """The value given for any of `names` in `argv` (`--k v` or `--k=v`; the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                value = argv[i + 1]
            elif a.startswith(n + "="):
                value = a[len(n) + 1:]
    return value


def is_demo(argv: list[str]) -> bool:
    """No recipe given: the domain's offline demo runs."""
    return not any(a == "--config" or a.startswith("--config=") for a in argv)


def attached_methods(model) -> list[dict[str, Any]]:
    """What is really attached (a bundle given by --model.init_bundle replaces `methods`)."""
    from shared.peft.core import split

    backbone, _ = split(model.model)
    state = getattr(backbone, "peft_state", None)
    return [m.to_dict() for _, m in state.methods] if state is not None else list(model.hparams.methods or [])


def method_label(methods: list[dict[str, Any]] | None) -> str:
    """A short readable name for a method list, e.g. `adapter(conformer,ffn,parallel)+lora`."""
    if not methods:
        return "linear_probe"
    parts = []
    for m in methods:
        detail = [str(m[k]) for k in ("kind", "placement", "mode") if k in m]
        parts.append(m["name"] + (f"({','.join(detail)})" if detail else ""))
    return "+".join(parts)


def recipe_of(cfg) -> dict[str, Any]:
    """The run's resolved recipe (what `--print_config` shows), without where it was written: the
    report groups runs whose recipes differ only in fold / seed."""
    d = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    d = {k: v for k, v in d.items() if k not in ("config", "output_dir", "run_name", "resume")}
    if isinstance(d.get("trainer"), dict):
        d["trainer"] = {k: v for k, v in d["trainer"].items() if k != "default_root_dir"}
    return json.loads(json.dumps(d, default=str))


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


class ConfigError(ValueError):
    """A recipe or flag the parser refuses; the message names the file and line (or the flag)."""


def prog_name() -> str:
    """How the user started us: `python -m audio.train` rather than `.../audio/train.py`."""
    from shared.lifecycle import program

    return program()


def _key_lines(path: Path) -> dict[str, int]:
    """{dotted key: 1-based line} for every mapping key in a YAML file."""
    import yaml

    out: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                out.setdefault(key, k.start_mark.line + 1)
                walk(v, key)

    try:
        walk(yaml.compose(path.read_text()), "")
    except (OSError, yaml.YAMLError):
        pass
    return out


def recipe_files(argv: list[str]) -> list[Path]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return [Path(f) for f in files]


def check_recipes(argv: list[str]) -> None:
    """Refuse, before anything else runs, a recipe that is missing or is not valid YAML (file and line)."""
    import yaml

    for f in recipe_files(argv):
        if not f.is_file():
            raise ConfigError(f"{f}: recipe not found (--config); recipes live in domains/<domain>/")
        try:
            yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{f}{where}: YAML syntax error: {problem} "
                              f"(check brackets, quotes and indentation there)") from None


def config_error_message(message: str, argv: list[str], defaults: list[str]) -> str:
    """The parser's complaint, first, with the recipe file and line of the key it names (or the flag),
    and a short hint. jsonargparse names keys in quotes: "Group 'model' does not accept option 'lrr'"."""
    message = root_cause(message).strip().splitlines()
    quoted = re.findall(r"'([^']+)'", message[0]) if message else []
    hint = f"({prog_name()} ... --print_config shows every valid key and its value)"
    for f in reversed([*map(Path, defaults), *recipe_files(argv)]):  # the last recipe wins
        for key, line in _key_lines(f).items():
            parts = key.split(".")
            if quoted and parts[-1] == quoted[-1].split(".")[-1] and all(
                    q.split(".")[-1] in parts or q in key for q in quoted[:-1]):
                return f"{f} line {line}: {' '.join(message)} {hint}"
    flags = [a.split("=")[0] for a in argv if a.startswith("--") and quoted and quoted[-1].split(".")[-1] in a]
    where = f"command line {flags[-1]}: " if flags else ""
    return f"{where}{' '.join(m.strip() for m in message)} {hint}"


_DROPPED = ("💡 Tip:", "Restoring states from", "Restored all states from", "Loading `train_dataloader` to estimate",
            "The following callbacks returned in `LightningModule.configure_callbacks`", "TPU available",
            "GPU available", "HPU available", "Seed set to", "LOCAL_RANK:",
            "Loaded model weights from the checkpoint at", "`Trainer.fit` stopped: `max_epochs",
            "Received SIGTERM:")  # our own line says what a stop does


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(d in msg for d in _DROPPED)


def quiet_lightning() -> None:
    """Silence Lightning's tips, device census, checkpoint-restoring notes (they name our staging
    folder), the tensorboardX notice and deprecation warnings raised inside libraries we call; our own
    lines say what matters (device, progress, where the results went)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in logger.filters):
            logger.addFilter(_DropLightningChatter())
    warnings.filterwarnings("ignore", message=r".*`tensorboardX` has been removed as a dependency.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(lightning|torch|torchmetrics|jsonargparse|timm|transformers)\b")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")
    # a resumed run logs on into its stopped run's folders (CSVLogger appends; it does not delete)
    warnings.filterwarnings("ignore", message=r".*(Experiment logs|Checkpoint) directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # run(args=[...]) from Python (tests, notebooks) while the interpreter has its own argv
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python.*")


class EpochLine(L.Callback):
    """One line per epoch (train loss, validation metrics, seconds) appended to `<run>/train.log`, and
    printed when there is no progress bar (stdout is not a terminal: a log file)."""

    def __init__(self, log_file: Path, echo: bool):
        self.log_file, self.echo, self.t0 = Path(log_file), echo, time.time()

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.ckpt_path:
            self._write(f"resumed after epoch {trainer.current_epoch}/{trainer.max_epochs} from {Path(trainer.ckpt_path).name}")

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.time()

    def _write(self, line: str) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as fh:
            fh.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
        if not trainer.is_global_zero:  # DDP: rank 0 alone writes and prints
            return
        m = {k: v for k, v in trainer.callback_metrics.items()
             if k.startswith(("train/", "val/")) and not k.endswith("_dropped")}
        vals = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(m.items()) if getattr(v, "numel", lambda: 1)() == 1)
        self._write(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {vals} ({time.time() - self.t0:.1f} s)")


class RngState(L.Callback):
    """Keeps the random generators' states (torch, CUDA, numpy, python) in every checkpoint and puts them
    back when a run resumes, so the resumed run draws the same shuffles and dropout masks as an
    uninterrupted one. They are restored as the checkpoint is loaded: a resumed fit loop opens its first
    epoch's data iterator (which draws the shuffle seed) before any epoch hook runs."""

    def state_dict(self) -> dict:
        import numpy as np
        import torch

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}

    def load_state_dict(self, state: dict) -> None:
        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class LastCheckpoint(Checkpoint):
    """`last.ckpt` in the staging folder at the end of every training epoch: what `--resume` continues from.
    It runs after every other checkpoint callback (attach it last: `with_last_checkpoint`), so the state it
    saves includes their choice of the best epoch."""

    def __init__(self, dirpath: str | os.PathLike):
        self.path = Path(dirpath) / LAST
        self.epoch: int | None = None  # the last epoch saved (1-based)

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation
        if trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; rank 0 writes (atomically)
        self.epoch = trainer.current_epoch + 1


def with_last_checkpoint(model, stage: Path) -> LastCheckpoint:
    """Append a LastCheckpoint to the model's own callbacks: model callbacks come after the Trainer's, so
    it saves after the model's best-checkpoint callback has updated its state for the epoch."""
    own = model.configure_callbacks
    last = LastCheckpoint(stage)

    def configure_callbacks():
        cbs = own() or []
        return [*(cbs if isinstance(cbs, (list, tuple)) else [cbs]), last]

    model.configure_callbacks = configure_callbacks
    return last


def keep_logger_version(trainer, stage: Path) -> None:
    """A resumed run logs on into the stopped run's logger folder (`lightning_logs/version_N` in the staging
    folder), where its best checkpoint lives, instead of opening version N+1."""
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is None or getattr(logger, "_version", "unset") is not None:
            continue
        try:
            Path(save_dir).resolve().relative_to(stage.resolve())
        except ValueError:
            continue
        root = Path(save_dir) / (getattr(logger, "name", "") or "")
        versions = [int(d.name.split("_", 1)[1]) for d in root.glob("version_*") if d.name.split("_", 1)[1].isdigit()]
        if versions:
            logger._version = max(versions)


def run(model_class=ClassificationModule, default_config: str | Path | None = None,
        args: list[str] | None = None, describe=None, evaluate=None, usage: str | None = None) -> dict[str, Any]:
    """Parse the CLI / recipe, train, test the best checkpoint, save bundle + metrics.

    `describe(model, datamodule)` may print domain-specific notes (or raise) before training;
    `evaluate(model, datamodule) -> dict` adds metrics computed after testing (e.g. per volume).
    Returns the metrics row that was written. Stopped by SIGTERM / SIGINT: raises RunStopped (its message
    says how to resume); the previous contents of --output_dir stay as they were.
    """
    defaults = [str(default_config)] if default_config else []
    argv = sys.argv[1:] if args is None else list(args)
    quiet_lightning()
    check_recipes(argv)
    PeftCLI.claim = None
    with stop_signals():
        try:
            cli = PeftCLI(model_class, L.LightningDataModule, subclass_mode_data=True, run=False, args=args,
                          parser_kwargs={"default_config_files": defaults, "exit_on_error": False,
                                         **({"usage": usage} if usage else {})},
                          save_config_callback=None, auto_configure_optimizers=False,
                          trainer_defaults={"max_epochs": 5, "accelerator": "auto", "devices": 1,
                                            "log_every_n_steps": 5, "num_sanity_val_steps": 0,
                                            "enable_progress_bar": sys.stdout.isatty()})
        except BaseException as e:  # e.g. a bad recipe value: remove the staging folder this run made
            claim, PeftCLI.claim = PeftCLI.claim, None
            if claim is not None:
                claim.close(e)
            if isinstance(e, argparse.ArgumentError) and not os.environ.get("PEFT_SUITE_TRACEBACK"):
                raise ConfigError(config_error_message(str(e), argv, defaults)) from None
            raise
        claim, PeftCLI.claim = cli.claim, None
        try:
            row = _fit_test_save(cli, claim, evaluate, describe)
        except BaseException as e:
            claim.close(e)  # a stopped run keeps its staging folder for --resume; a failed one's goes
            raise
        claim.close()
        return row


def _fit_test_save(cli, claim: OutputRun, evaluate, describe) -> dict[str, Any]:
    cfg = cli.config
    out = Path(cfg["output_dir"])
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    stage = cli.stage
    trainer.callbacks.extend([EpochLine(stage / "train.log", echo=not trainer.progress_bar_callback), RngState()])
    with_last_checkpoint(model, stage)
    if claim.resume_from is not None:
        keep_logger_version(trainer, stage)
    if trainer.is_global_zero:
        print(f"device: {trainer.strategy.root_device}" + (" (a GPU is available: --trainer.accelerator gpu)"
              if trainer.strategy.root_device.type == "cpu" and _cuda_available() else ""))
    if describe:
        describe(model, data)
    s = model.param_summary()
    if trainer.is_global_zero:
        print(f"trainable parameters: {s['trainable']:,} of {s['total']:,} ({s['trainable_percent']:.3f}%) "
              f"by method: {s['by_method']}")
    t0, cpu0 = time.time(), time.process_time()  # CPU: every thread of this process (fit + test)
    with deferred_stop(trainer):
        trainer.fit(model, datamodule=data, ckpt_path=claim.resume_from)
    best = next((c for c in trainer.checkpoint_callbacks if not isinstance(c, LastCheckpoint)
                 and getattr(c, "best_model_path", None)), None)
    ckpt = best.best_model_path if best is not None else None
    with deferred_stop(trainer):
        tested = trainer.test(model, datamodule=data, ckpt_path=ckpt, verbose=False)
    metrics = _json_safe(tested[0] if tested else {})
    sharded = is_sharded(model)  # FSDP2: every forward and the bundle's gathering need every process
    if evaluate and (trainer.is_global_zero or sharded):
        with whole(model.model):
            metrics.update(_json_safe(evaluate(model, data)))
    # which metric definitions the numbers follow ("reference" or the option; docs/metrics.md)
    definition = {"definition": data.metric_definition} if getattr(data, "metric_definition", None) else {}
    row = {"run": cfg["run_name"] or out.name, "backbone": model.hparams.backbone,
           "dataset": getattr(data, "name", type(data).__name__), "fold": getattr(data, "test_fold", None),
           "few_shot": getattr(data, "few_shot", None), "protocol": getattr(data, "protocol", None),
           **definition,
           "monitor": model.monitor if ckpt else None,  # the metric that chose the tested checkpoint
           "units": getattr(model, "metric_units", None),  # e.g. {"test/hd95": "px (model input)"}
           "method": method_label(attached_methods(model)),
           "trainable_params": s["trainable"], "total_params": s["total"], **metrics,
           "best_checkpoint": Path(ckpt).name if ckpt else None,
           "train_seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
           "config": recipe_of(cfg)}
    if trainer.is_global_zero or sharded:  # under torch.distributed process 0 writes
        model.save_bundle(stage / "adapter", metrics={**metrics, **definition})
    if trainer.is_global_zero:
        write_json_atomic(stage / "metrics.json", row)
        claim.publish()
        print("test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        print(f"adapter bundle saved to {out / 'adapter'}")
        logs = [out / "train.log"] if (out / "train.log").is_file() else []
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            try:
                logs.append(out / Path(trainer.logger.log_dir).relative_to(stage))
            except ValueError:  # a logger configured to write elsewhere
                logs.append(Path(trainer.logger.log_dir))
        print(f"metrics written to {out / 'metrics.json'}" + (f"; logs: {', '.join(map(str, logs))}" if logs else ""))
    return row


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


DEMO_MARKER = ".peft-suite-demo"  # in every folder a demo writes its synthetic data into


def mark_demo_folder(root: str | os.PathLike, note: str) -> None:
    """Mark `root` as demo data of ours, before any data is written (a torn write is resumed)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / DEMO_MARKER).is_file():
        atomic_write(root / DEMO_MARKER, f"written by the peft-suite demo: {note}\n")


def prepare_demo_data(root: str | os.PathLike, write_demo_data, demo_note: str, recipes: Path | None = None) -> Path:
    """Write the demo's synthetic data into `root` (reused when complete), but only into a folder that
    is new, empty or marked as written by a demo: a folder holding anything else is refused (it is
    someone's data, and a run without --config would train on the demo data written into it)."""
    root = Path(root)
    marker = root / DEMO_MARKER
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: is a file; the demo (no --config) writes its synthetic data into a folder")
    if root.is_dir() and not marker.is_file() and any(root.iterdir()):
        where = f" (recipes in {recipes})" if recipes else ""
        raise ValueError(f"{root}: this folder holds files the demo did not write; without --config the demo writes "
                         f"synthetic data only into a new or empty folder. To train on your data, pass a recipe: "
                         f"--config RECIPE.yaml --data.root {root}{where}")
    fresh = not marker.is_file()
    mark_demo_folder(root, demo_note)
    print(f"demo: {demo_note} in {root}" + (" (writing it now)" if fresh else " (reused)"))
    write_demo_data(root)
    return root


def domain_main(argv: list[str] | None, demo_config: str | Path, write_demo_data, demo_note: str,
                model_class=ClassificationModule, describe=None, evaluate=None) -> dict[str, Any]:
    """A domain's `train` entry: with no `--config`, write the demo data (if missing) where the demo
    recipe (or `--data.root`) says and run the demo recipe; otherwise run the given recipes."""
    cli_args, argv = argv, sys.argv[1:] if argv is None else argv
    demo = is_demo(argv)
    if demo and not {"-h", "--help", "--print_config"} & set(argv):
        import yaml

        root = arg_value(argv, "--data.root", "--data.init_args.root") or \
            yaml.safe_load(Path(demo_config).read_text())["data"]["init_args"]["root"]
        prepare_demo_data(root, write_demo_data, demo_note, recipes=Path(demo_config).parent)
    return run(model_class, default_config=demo_config if demo else None, args=cli_args, describe=describe,
               evaluate=evaluate, usage=domain_usage(demo_config, demo_note))


def domain_usage(demo_config: str | Path, demo_note: str) -> str:
    """Our own usage, shown first by --help (Lightning's options follow)."""
    prog, recipes = prog_name(), Path(demo_config).parent
    try:
        recipes = recipes.relative_to(Path.cwd())
    except ValueError:
        pass
    subdirs = sorted(d.name for d in Path(demo_config).parent.iterdir() if d.is_dir())
    return (f"{prog} --config RECIPE.yaml [--config RECIPE.yaml ...] [--KEY VALUE ...]\n"
            f"       {prog}                       (no arguments: the offline demo, {demo_note})\n\n"
            f"  recipes: {recipes}/*.yaml" + (f" and {recipes}/{{{','.join(subdirs)}}}/*.yaml" if subdirs else "") +
            f"; later --config files and flags override earlier ones\n"
            f"  every recipe key is a flag: --data.root /data/X --trainer.max_epochs 10 --output_dir runs/x\n"
            f"  --print_config shows the resolved recipe; each run writes OUTPUT_DIR/{{adapter/, metrics.json, train.log}}\n\n"
            f"all options (Lightning CLI):")


def friendly(entry, *args, **kwargs) -> int:
    """Run a CLI entry and return its exit status: 0 done; 2 for our errors (ValueError subclasses that name
    the file or field: bad input, a bad recipe, a busy output folder), printed as one line instead of a
    traceback; 143 / 130 when SIGTERM / SIGINT stopped the run (one line says what was kept and how to
    resume); an unexpected error raises (a traceback, status 1)."""
    try:
        with stop_signals():
            entry(*args, **kwargs)
    except RunStopped as e:
        return report_stop(e)
    except (ValueError, KeyError) as e:
        if os.environ.get("PEFT_SUITE_TRACEBACK"):
            raise
        print(f"error: {root_cause(str(e))}", file=sys.stderr)
        return 2
    return 0


def root_cause(message: str) -> str:
    """jsonargparse reports a failing `data:` class as "Does not validate against any of the Union
    subtypes" with our error buried in a list; surface that error."""
    for path in re.findall(r"class_path '([\w.]+)'", message):
        from shared.moved import moved_in

        if moved_in(path):
            return f"class_path {moved_in(path)}"
    if "Union subtypes" not in message:
        return message
    causes = [line.strip()[2:] for line in message.splitlines()
              if line.strip().startswith("- ") and "NoneType" not in line]
    return causes[0] if causes else message


def main(default_config: str | Path | None = None, **kw) -> None:
    run(default_config=default_config, **kw)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_tool_args(parser, argv: list[str], demo_config: str | Path):
    """Parse a jsonargparse tool's arguments (the probe runners) the way every domain CLI does: the
    demo recipe as default config when no arguments are given, recipe files checked first, and a
    parse error turned into one ConfigError line naming the recipe key."""
    defaults = [str(demo_config)] if is_demo(argv) else []
    parser.default_config_files = defaults
    quiet_lightning()
    check_recipes(argv)
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise ConfigError(config_error_message(str(e), argv, defaults)) from None


def unique_stems(paths, stem=lambda p: p.stem) -> list[str]:
    """One output name stem per input path, never the same twice in a call (compared ignoring case,
    as macOS / Windows file systems do): `stem(path)` where that is unique, else prefixed with as
    many parent folder names as make it unique (a/photo.jpg, b/photo.png -> a_photo, b_photo), and
    a counter as a last resort (the same file given twice: photo, photo-2)."""
    paths = [Path(p) for p in paths]
    base = [stem(p) for p in paths]
    out = list(base)
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(base):
        groups.setdefault(b.lower(), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        files = {paths[i].resolve(): base[i] for i in members}  # file -> its stem as given (a link keeps its name)
        if len(files) < 2:
            continue  # one file given several times: the counter below
        parents = {f: [q.name for q in reversed(f.parents) if q.name] for f in files}
        for depth in range(1, max(len(ps) for ps in parents.values()) + 1):
            names = {f: "_".join(ps[-depth:] + [files[f]]) for f, ps in parents.items()}
            if len({n.lower() for n in names.values()}) == len(names):
                break
        for i in members:
            out[i] = names[paths[i].resolve()]
    taken: set[str] = set()
    for i, n in enumerate(out):  # still equal (the same file twice), or equal to another file's stem
        name, k = n, 1
        while name.lower() in taken:
            k += 1
            name = f"{n}-{k}"
        taken.add(name.lower())
        out[i] = name
    return out


def stream_results(items, show, errors: list[str] | None = None,
                   stop: tuple[type[Exception], ...] = (), prefix: str = "error") -> int:
    """The shared loop of the predict CLIs: each item the iterable yields is handled as soon as it
    comes, so a long run shows its results as it goes and a crash loses none of those already made.
    An item that is an exception is one file's error: `<prefix>: <message>` on stderr at once
    (`error`; vision.predict says `skipped`); any other item goes to `show(item)` (which prints it).
    Messages appended to `errors` meanwhile are printed after each item. Both streams are flushed
    after every item (stdout may be a pipe or a file). The batched CLIs (`shared.predict`) yield a
    file's error when its decoding fails and a batch's results when the batch is done, so what is
    printed always is what has been made. Nothing is kept per item.
    Exit status: 2 when an error of a `stop` type ends the run or any file failed, else 0."""
    failed = 0
    seen = 0

    def drain() -> int:
        nonlocal seen
        new = list(errors[seen:]) if errors is not None else []
        seen += len(new)
        for e in new:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return len(new)

    try:
        for item in items:
            if isinstance(item, Exception):
                sys.stdout.flush()  # the lines before it come first, as they were made
                print(f"{prefix}: {item}", file=sys.stderr, flush=True)
                failed += 1
            else:
                show(item)
                sys.stdout.flush()
            failed += drain()
    except stop as e:
        failed += drain()
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    failed += drain()
    return 2 if failed else 0


def print_top(results, errors: list[str] | None, stop: tuple[type[Exception], ...]) -> int:
    """The shared tail of the predict CLIs: print `name` then `  score  label` lines for each
    (name, [(label, score), ...]) the iterable yields, as soon as it is yielded; a yielded exception
    is one file's error (printed on stderr at once, see `stream_results`); exit status 2 when an
    error of a `stop` type ends the run or any file failed, else 0."""
    def show(item):
        name, top = item
        print(name)
        for label, score in top:
            print(f"  {score:6.3f}  {label}")

    return stream_results(results, show, errors, stop)
