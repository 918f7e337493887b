"""The LightningCLI entry reused by every `<domain>.train`.

`python -m audio.train --config domains/audio/esc50_adapter.yaml --data.root ...`: every CLI
flag is a recipe key. A run trains, tests the best-validation checkpoint, saves the adapter
bundle and a metrics row, and only then moves its outputs into `--output_dir`: a failed run
never overwrites a previous run's results.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
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


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, default=str))


def run(model_class=ClassificationModule, default_config: str | Path | None = None,
        args: list[str] | None = None, describe=None, evaluate=None) -> dict[str, Any]:
    """Parse the CLI / recipe, train, test the best checkpoint, save bundle + metrics.

    `describe(model, datamodule)` may print domain-specific notes (or raise) before training;
    `evaluate(model, datamodule) -> dict` adds metrics computed after testing (e.g. per volume).
    Returns the metrics row that was written.
    """
    defaults = [str(default_config)] if default_config else []
    try:
        cli = PeftCLI(model_class, L.LightningDataModule, subclass_mode_data=True, run=False, args=args,
                      parser_kwargs={"default_config_files": defaults},
                      save_config_callback=None, auto_configure_optimizers=False,
                      trainer_defaults={"max_epochs": 5, "accelerator": "auto", "devices": 1,
                                        "log_every_n_steps": 5, "num_sanity_val_steps": 0})
    except BaseException:  # e.g. a bad recipe value: remove the staging folder this run made
        stage = os.environ.pop(STAGE_ENV, None)
        if stage and os.environ.get("LOCAL_RANK", "0") == "0":
            shutil.rmtree(stage, ignore_errors=True)
        raise
    cfg = cli.config
    out = Path(cfg["output_dir"])
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    stage = cli.stage
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
               "few_shot": getattr(data, "few_shot", None), "method": method_label(attached_methods(model)),
               "trainable_params": s["trainable"], "total_params": s["total"], **metrics,
               "best_checkpoint": Path(trainer.checkpoint_callback.best_model_path).name if ckpt else None,
               "train_seconds": round(time.time() - t0, 1)}
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
    return row


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
        print(f"demo: {demo_note} in {root} (written on first use)")
        write_demo_data(root)
    return run(model_class, default_config=demo_config if demo else None, args=cli_args, describe=describe,
               evaluate=evaluate)


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
    if "Union subtypes" not in message:
        return message
    causes = [line.strip()[2:] for line in message.splitlines()
              if line.strip().startswith("- ") and "NoneType" not in line]
    return causes[0] if causes else message


def main(default_config: str | Path | None = None, **kw) -> None:
    run(default_config=default_config, **kw)
