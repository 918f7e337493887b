"""The LightningCLI entry reused by every `<domain>.train`.

`python -m audio.train --config domains/audio/esc50_adapter.yaml --data.root ...`: every CLI
flag is a recipe key. A run trains, tests the best-validation checkpoint, saves the adapter
bundle and a metrics row, and only then moves its outputs into `--output_dir`: a failed run
never overwrites a previous run's results.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from shared.fs import atomic_write, replace_dir
from shared.module import ClassificationModule


STAGE_ENV = "PEFT_SUITE_STAGE_DIR"


class PeftCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.add_argument("--output_dir", default="runs/demo", help="where the bundle, metrics and logs go")
        parser.add_argument("--run_name", default="", help="name of this run in the results table")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        parser.link_arguments("data.preprocessing", "model.preprocessing", apply_on="instantiate")

    def before_instantiate_classes(self):
        # Everything the run writes goes to a staging folder next to output_dir first. DDP
        # workers re-run this CLI; they inherit the launcher's staging folder through the env.
        out = Path(self.config["output_dir"])
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = os.environ.get(STAGE_ENV) or tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent)
        os.environ[STAGE_ENV] = stage
        self.stage = Path(stage)
        self.config["trainer"]["default_root_dir"] = stage


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
    d = {k: v for k, v in d.items() if k not in ("config", "output_dir", "run_name")}
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
    p = Path(sys.argv[0])
    return f"python -m {p.parent.name}.{p.stem}" if p.suffix == ".py" and p.parent.name else p.name


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


_DROPPED = ("💡 Tip:", "Restoring states from", "Loading `train_dataloader` to estimate",
            "The following callbacks returned in `LightningModule.configure_callbacks`", "TPU available",
            "GPU available", "HPU available", "Seed set to", "LOCAL_RANK:",
            "Loaded model weights from the checkpoint at", "`Trainer.fit` stopped: `max_epochs")


class _DropLightningChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(d in msg for d in _DROPPED)


def quiet_lightning() -> None:
    """Silence Lightning's tips, device census, checkpoint-restoring notes (they name our staging
    folder), the tensorboardX notice and deprecation warnings raised inside libraries we call; our own
    lines say what matters (device, progress, where the results went)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in logger.filters):
            logger.addFilter(_DropLightningChatter())
    warnings.filterwarnings("ignore", message=r".*`tensorboardX` has been removed as a dependency.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(lightning|torch|torchmetrics|jsonargparse|timm|transformers)\b")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    # run(args=[...]) from Python (tests, notebooks) while the interpreter has its own argv
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python.*")


class EpochLine(L.Callback):
    """One line per epoch (train loss, validation metrics, seconds) appended to `<run>/train.log`, and
    printed when there is no progress bar (stdout is not a terminal: a log file)."""

    def __init__(self, log_file: Path, echo: bool):
        self.log_file, self.echo, self.t0 = Path(log_file), echo, time.time()

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
        if not trainer.is_global_zero:
            return
        m = {k: v for k, v in trainer.callback_metrics.items()
             if k.startswith(("train/", "val/")) and not k.endswith("_dropped")}
        vals = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(m.items()) if getattr(v, "numel", lambda: 1)() == 1)
        line = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {vals} ({time.time() - self.t0:.1f} s)"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as fh:
            fh.write(line + "\n")
        if self.echo:
            print(line, flush=True)


def run(model_class=ClassificationModule, default_config: str | Path | None = None,
        args: list[str] | None = None, describe=None, evaluate=None, usage: str | None = None) -> dict[str, Any]:
    """Parse the CLI / recipe, train, test the best checkpoint, save bundle + metrics.

    `describe(model, datamodule)` may print domain-specific notes (or raise) before training;
    `evaluate(model, datamodule) -> dict` adds metrics computed after testing (e.g. per volume).
    Returns the metrics row that was written.
    """
    defaults = [str(default_config)] if default_config else []
    argv = sys.argv[1:] if args is None else list(args)
    quiet_lightning()
    check_recipes(argv)
    try:
        cli = PeftCLI(model_class, L.LightningDataModule, subclass_mode_data=True, run=False, args=args,
                      parser_kwargs={"default_config_files": defaults, "exit_on_error": False,
                                     **({"usage": usage} if usage else {})},
                      save_config_callback=None, auto_configure_optimizers=False,
                      trainer_defaults={"max_epochs": 5, "accelerator": "auto", "devices": 1,
                                        "log_every_n_steps": 5, "num_sanity_val_steps": 0,
                                        "enable_progress_bar": sys.stdout.isatty()})
    except BaseException as e:  # e.g. a bad recipe value: remove the staging folder this run made
        stage = os.environ.pop(STAGE_ENV, None)
        if stage and os.environ.get("LOCAL_RANK", "0") == "0":
            shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, argparse.ArgumentError) and not os.environ.get("PEFT_SUITE_TRACEBACK"):
            raise ConfigError(config_error_message(str(e), argv, defaults)) from None
        raise
    cfg = cli.config
    out = Path(cfg["output_dir"])
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    stage = cli.stage
    trainer.callbacks.append(EpochLine(stage / "train.log", echo=not trainer.progress_bar_callback))
    if trainer.is_global_zero:
        print(f"device: {trainer.strategy.root_device}" + (" (a GPU is available: --trainer.accelerator gpu)"
              if trainer.strategy.root_device.type == "cpu" and _cuda_available() else ""))
    try:
        if describe:
            describe(model, data)
        s = model.param_summary()
        print(f"trainable parameters: {s['trainable']:,} of {s['total']:,} ({s['trainable_percent']:.3f}%) "
              f"by method: {s['by_method']}")
        t0 = time.time()
        trainer.fit(model, datamodule=data)
        ckpt = "best" if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path else None
        tested = trainer.test(model, datamodule=data, ckpt_path=ckpt, verbose=False)
        metrics = _json_safe(tested[0] if tested else {})
        if evaluate and trainer.is_global_zero:
            metrics.update(_json_safe(evaluate(model, data)))
        row = {"run": cfg["run_name"] or out.name, "backbone": model.hparams.backbone,
               "dataset": getattr(data, "name", type(data).__name__), "fold": getattr(data, "test_fold", None),
               "few_shot": getattr(data, "few_shot", None), "protocol": getattr(data, "protocol", None),
               "monitor": model.monitor if ckpt else None,  # the metric that chose the tested checkpoint
               "units": getattr(model, "metric_units", None),  # e.g. {"test/hd95": "px (model input)"}
               "method": method_label(attached_methods(model)),
               "trainable_params": s["trainable"], "total_params": s["total"], **metrics,
               "best_checkpoint": Path(trainer.checkpoint_callback.best_model_path).name if ckpt else None,
               "train_seconds": round(time.time() - t0, 1), "config": recipe_of(cfg)}
        if trainer.is_global_zero:
            model.save_bundle(stage / "adapter", metrics=metrics)
            write_json_atomic(stage / "metrics.json", row)
            replace_dir(stage, out)
    except BaseException:
        if trainer.is_global_zero:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        os.environ.pop(STAGE_ENV, None)
    if trainer.is_global_zero:
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
    """Run a CLI entry; our errors (ValueError subclasses that name the file or field) print as one
    line instead of a traceback. Exit code 2 on such an error."""
    try:
        entry(*args, **kwargs)
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


def print_top(results, errors: list[str], stop: tuple[type[Exception], ...]) -> int:
    """The shared tail of the predict CLIs: print `name` then `  score  label` lines for each
    (name, [(label, score), ...]) the iterable yields, then the per-file errors; exit status 2 when an
    error of a `stop` type ends the run or any file failed, else 0."""
    try:
        for name, top in results:
            print(name)
            for label, score in top:
                print(f"  {score:6.3f}  {label}")
    except stop as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 2 if errors else 0
