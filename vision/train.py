"""Multi-task dense adaptation of a frozen Swin (Polyhistor and baselines).

    python -m vision.train                      # offline demo: synthetic PASCAL-Context-layout scenes,
                                                #   tiny random Swin, Polyhistor-Lite + single-task baselines, Delta_m
    python -m vision.train --config domains/vision/pascal_context.yaml \\
        --config domains/vision/methods/polyhistor_lite.yaml --data.root /data/PASCAL_MT
    python -m vision.train --config ... --data.tasks '[semseg]' --model.methods '[{name: full}]'   # a single-task baseline

Every key of a recipe is also a flag (`--data.size 224`, `--model.lr 1e-3`, `--trainer.max_epochs 60`);
`--print_config` prints the resolved recipe. A run writes output_dir/{adapter/, metrics.json,
train.log} through a staging folder under the output folder's lock, so a failed or stopped run never
overwrites a previous one. SIGTERM / SIGINT stop a run (exit 143 / 130); `--resume` (same flags)
continues it from the last.ckpt its staging folder keeps (docs/operations.md).

`--model.depth_cache {off,auto,fp16,bf16,fp32}` (the other domains' depth caching, docs/core.md) is
accepted but refused here with a warning: the dense decoders read every Swin stage's features and the
hypernetwork methods adapt every block, so training always runs the whole backbone.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from shared import peft
from shared.distributed import full_tensor, is_main, is_sharded
from shared.fs import atomic_write

DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/vision/run",
    "run_name": "",
    "seed": 0,
    "data": {"root": None, "layout": "pascal_context", "tasks": None, "size": 224, "batch_size": 8,
             "num_workers": 0, "missing": "skip", "num_classes": None, "cache": False},
    "model": {"backbone": "swin-t", "backbone_kwargs": {}, "methods": [{"name": "polyhistor_lite"}],
              "decoder_width": 64, "lr": 1e-3, "weight_decay": 1e-4, "warmup_steps": 0,
              "depth_cache": "off"},  # accepted for symmetry with the other domains; refused (DEPTH_CACHE_REFUSED)
    # metric definitions: "reference" (the multi-task benchmark's code), "previous", or {task: name}
    # (vision.metrics.DEFINITIONS); metrics.json and the bundle record the one used per task
    "eval": {"definition": "reference"},
    "trainer": {"max_epochs": 30, "accelerator": "auto", "devices": 1, "precision": "32-true",
                "log_every_n_steps": 10},
}
DEMO_ROOT = Path("runs/vision_demo")
# Why `model.depth_cache` (shared.depth_cache) does not apply here; a run that asks for it warns and trains as usual.
DEPTH_CACHE_REFUSED = (
    "vision.train's decoders read the feature map of every Swin stage (multi-scale), so no single block's input "
    "holds what the rest of the model needs, and the Polyhistor / hypernetwork methods adapt every block")
DEMO_MARK = ".peft-suite-demo"


class ConfigError(ValueError):
    pass


def _merge(base: dict, new: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown key {prefix + k!r}; known keys: {', '.join(prefix + x for x in base)}")
        free = prefix + k in ("model.backbone_kwargs", "data.num_classes", "trainer")  # open dicts
        if isinstance(base[k], dict) and isinstance(v, dict) and not free:
            out[k] = _merge(base[k], v, where, prefix + k + ".")
        elif prefix + k == "trainer" and isinstance(v, dict):
            out[k] = {**base[k], **v}
        else:
            out[k] = v
    return out


def _value(text: str):
    """A flag's value as YAML; numbers YAML 1.1 reads as strings (`5e-3`) become floats."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse(argv: list[str]) -> tuple[dict[str, Any], bool]:
    """(config, print_config). `--config f.yaml` merges a recipe; `--a.b value` sets one key (YAML value)."""
    cfg, show, i = copy.deepcopy(DEFAULTS), False, 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if a == "--print_config":
            show, i = True, i + 1
            continue
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r} (flags are --key value)")
        key, _, val = a[2:].partition("=")
        if not _:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            val, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            path = Path(val)
            try:
                recipe = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ConfigError(f"{path}: cannot read recipe ({e})") from None
            if not isinstance(recipe, dict):
                raise ConfigError(f"{path}: a recipe must be a mapping of keys")
            cfg = _merge(cfg, recipe, str(path))
            continue
        node: dict[str, Any] = {}
        cur = node
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _value(val)
        cfg = _merge(cfg, node, f"--{key}")
    return cfg, show


def run(cfg: dict[str, Any], echo: bool = True, resume: bool | str = False) -> dict[str, Any]:
    """Train one configuration, evaluate on the val split, save bundle + metrics; returns metrics.json.
    `resume`: continue the stopped run of cfg's output_dir from its last.ckpt (an error when there is none;
    "if-any": start afresh then). Stopped by SIGTERM / SIGINT: raises shared.lifecycle.RunStopped."""
    import lightning as L

    from shared.lifecycle import OutputRun

    from .data import DenseDataModule
    from .model import build_model

    if not cfg["data"]["root"]:
        raise ConfigError("data.root is not set: pass --data.root /path/to/dataset (or run without arguments for the demo)")
    from shared.depth_cache import check_mode

    try:
        depth_cache = check_mode(cfg["model"].get("depth_cache", "off"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if depth_cache != "off":
        print(f"warning: depth_cache {depth_cache}: not used: {DEPTH_CACHE_REFUSED}; training runs on the normal path",
              file=sys.stderr, flush=True)
    L.seed_everything(cfg["seed"], verbose=False)
    dm = DenseDataModule(**cfg["data"], seed=cfg["seed"])
    model = build_model(cfg["model"]["backbone"], dm.tasks, cfg["model"]["methods"], cfg["model"]["backbone_kwargs"],
                        cfg["model"]["decoder_width"])
    from .module import DenseModule

    try:
        lr, wd = float(cfg["model"]["lr"]), float(cfg["model"]["weight_decay"])
    except (TypeError, ValueError):
        raise ConfigError(f"model.lr and model.weight_decay must be numbers, got {cfg['model']['lr']!r}, "
                          f"{cfg['model']['weight_decay']!r}") from None
    module = DenseModule(model, lr, wd, int(cfg["model"]["warmup_steps"]), definition=cfg["eval"]["definition"])
    out = Path(cfg["output_dir"])
    # the output folder's lock and a staging folder beside it for the whole run (DDP ranks inherit it):
    # a failed or stopped run leaves the previous results alone; a stopped one can be resumed
    claim = OutputRun(out, resume=resume)
    stage = claim.open()
    try:
        metrics = _fit_test_save(cfg, module, dm, model, claim, stage, echo)
    except BaseException as e:
        claim.close(e)
        raise
    claim.close()
    return metrics


def _fit_test_save(cfg, module, dm, model, claim, stage: Path, echo: bool) -> dict[str, Any]:
    import lightning as L

    from shared.cli import EpochLine, LastCheckpoint, RngState
    from shared.lifecycle import deferred_stop

    from .metrics import recorded_definitions
    from .model import trainable_counts

    out = Path(cfg["output_dir"])
    trainer_kw = {"enable_progress_bar": sys.stdout.isatty(), "enable_model_summary": False,
                  "num_sanity_val_steps": 0, **cfg["trainer"]}
    # last.ckpt in the staging folder each epoch (model, optimizer, scheduler, loops, RNG): what --resume continues
    trainer = L.Trainer(**trainer_kw, default_root_dir=stage, logger=False, enable_checkpointing=True,
                        callbacks=[EpochLine(stage / "train.log", echo=echo), RngState(), LastCheckpoint(stage)])
    t0 = time.time()
    with deferred_stop(trainer):
        trainer.fit(module, datamodule=dm, ckpt_path=claim.resume_from)
    with deferred_stop(trainer):
        trainer.test(module, datamodule=dm, verbose=False)
    counts = trainable_counts(model)
    methods = [m.to_dict() for _, m in model.backbone.peft_state.methods]
    metrics = {
        "run_name": cfg["run_name"] or out.name, "method": method_label(methods), "methods": methods,
        "tasks": list(dm.tasks), "lower_is_better": {t: task.lower_is_better for t, task in dm.tasks.items()},
        "primary": {t: task.metric for t, task in dm.tasks.items()},
        "test": module.results, "definition": recorded_definitions(module.definitions, dm.val_set.normals_mask),
        "params": counts, "missing_labels": {"train": dm.train_set.missing, "val": dm.val_set.missing},
        "protocol": f"{cfg['data']['layout']}: train on train, tested on val (the multi-task benchmarks' protocol)",
        "seconds": round(time.time() - t0, 1), "config": cfg,
    }
    if not trainer.is_global_zero:  # several processes: process 0 writes
        if is_sharded(module.model):  # FSDP2: the bundle's tensors are gathered from every process
            save_bundle(module.model, stage / "adapter", cfg, metrics)
        return metrics
    save_bundle(module.model, stage / "adapter", cfg, metrics)
    atomic_write(stage / "metrics.json", json.dumps(metrics, indent=2, default=str))
    claim.publish()
    return metrics


def method_label(methods: list[dict]) -> str:
    if not methods:
        return "decoder-only"
    return "+".join(m["name"] for m in methods)


def save_bundle(model, path: Path, cfg: dict, metrics: dict) -> None:
    """The PEFT bundle of the backbone (peft.save) plus the decoders and the task list."""
    from shared.artifacts import save_tensors

    vision = {"tasks": {t: {"channels": task.channels} for t, task in model.tasks.items()},
              "decoder_width": model.decoder_width, "size": cfg["data"]["size"], "layout": cfg["data"]["layout"],
              "definition": metrics["definition"]}  # the metric definition of each task's recorded metrics
    # sharded (FSDP2): every process gathers the decoders, then the backbone's tensors; process 0 writes
    sd = {k: full_tensor(v.detach()).cpu().contiguous() for k, v in model.decoders.state_dict().items()}
    peft.save(model.backbone, path, metrics={t: v for t, v in metrics["test"].items()}, extra={"domain": "vision", "vision": vision})
    if is_main():
        save_tensors(sd, path / "decoders.safetensors")  # the permissions of a plain open, like the bundle's


def load_bundle(path) -> "object":
    """The MultiTaskDense model a bundle describes (backbone rebuilt by its registered id)."""
    from safetensors.torch import load_file

    from shared.artifacts import check_domain

    from .model import MultiTaskDense
    from .tasks import make_task

    path = Path(path)
    meta = peft.read_meta(path)
    check_domain(meta, "vision", str(path), "python -m vision.train")
    if "vision" not in meta:
        raise ValueError(f"{path}: not a vision bundle (no 'vision' task table; python -m vision.train writes one)")
    v = meta["vision"]
    bb = peft.from_bundle(path)
    tasks = {t: make_task(t, spec["channels"] if t in ("semseg", "human_parts") else None) for t, spec in v["tasks"].items()}
    model = MultiTaskDense(bb, tasks, v["decoder_width"])
    dec = path / "decoders.safetensors"
    if not dec.is_file():
        raise ValueError(f"{dec}: missing (the bundle has no decoders)")
    model.decoders.load_state_dict(load_file(str(dec)))
    model.image_size = v["size"]
    return model.eval()


# --- the offline demo ---------------------------------------------------------------------------
DEMO_BACKBONE = {"backbone": "tiny-swin",
                 "backbone_kwargs": {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
                                     "window_size": 4}}


def demo_config(out: Path, data: Path, tasks, methods, name: str, epochs: int) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    cfg = _merge(cfg, {"output_dir": str(out / name), "run_name": name,
                       "data": {"root": str(data), "tasks": list(tasks), "size": 64, "batch_size": 8, "cache": True},
                       "model": {**DEMO_BACKBONE, "methods": methods, "decoder_width": 32, "lr": 5e-3},
                       "trainer": {"max_epochs": epochs, "accelerator": "cpu"}}, "demo")
    return cfg


def _demo_run(cfg: dict, echo: bool, resume: bool) -> dict:
    """One run of the demo; with --resume a run already finished with this configuration is not run again
    (its metrics.json is read back) and the stopped one continues."""
    done = Path(cfg["output_dir"]) / "metrics.json"
    if resume and done.is_file():
        m = json.loads(done.read_text())
        if m.get("config") == json.loads(json.dumps(cfg, default=str)):
            return m
    return run(cfg, echo=echo, resume="if-any" if resume else False)


def demo(root: Path = DEMO_ROOT, epochs: int = 6, resume: bool = False) -> dict:
    from .metrics import delta_m
    from .synthetic import write_pascal_context_like

    data = root / "pascal_context_synthetic"
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARK).exists():
        raise ConfigError(f"{root}: exists and was not written by the demo; the demo writes only into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARK).write_text("written by python -m vision.train (demo)\n")
    if not (data / "ImageSets").exists():
        write_pascal_context_like(data, train=32, val=16, size=64)
    print(f"demo: synthetic PASCAL-Context-layout scenes in {data}; tiny Swin with RANDOM weights (no download)")
    tasks = ["semseg", "human_parts", "saliency", "normals"]
    single = {}
    for t in tasks:
        m = _demo_run(demo_config(root, data, [t], [{"name": "full"}], f"single_full_{t}", epochs), False, resume)
        single[t] = m["test"][t][m["primary"][t]]
        print(f"single-task full fine-tuning, {t}: {m['primary'][t]} {single[t]:.4f} ({m['params']['trainable']:,} trainable)")
    cfg = demo_config(root, data, tasks, [{"name": "polyhistor_lite", "bottleneck": 8, "rank": 4, "templates": 4,
                                            "embed_dim": 16, "proj_dim": 16}], "multi_polyhistor_lite", epochs)
    m = _demo_run(cfg, True, resume)
    res = {t: m["test"][t][m["primary"][t]] for t in tasks}
    dm = delta_m(res, single, m["lower_is_better"])
    for t in tasks:
        print(f"Polyhistor-Lite, {t}: {m['primary'][t]} {res[t]:.4f} (single-task {single[t]:.4f})")
    print(f"Delta_m vs single-task full fine-tuning: {dm:+.2f}%  | trainable: backbone {m['params']['backbone']:,} "
          f"+ decoders {m['params']['decoders']:,} (single-task full: 4 separate backbones)")
    print(f"bundle: {cfg['output_dir']}/adapter  metrics: {cfg['output_dir']}/metrics.json  report: python -m vision.report {root}")
    return {"single": single, "multi": res, "delta_m": dm}


def main(argv: list[str] | None = None) -> None:
    """The CLI. Exit status: 0 done, 2 bad input (one line), 143 / 130 stopped by SIGTERM / SIGINT (one
    line: what was kept, how to resume), 1 an unexpected error (a traceback)."""
    from shared.cli import quiet_lightning
    from shared.lifecycle import RunStopped, report_stop, stop_signals

    argv = sys.argv[1:] if argv is None else argv
    resume = "--resume" in argv  # continue the stopped run of --output_dir (the demo: its stopped run)
    argv = [a for a in argv if a != "--resume"]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    quiet_lightning()
    try:
        with stop_signals():
            _main(argv, resume)
    except RunStopped as e:
        raise SystemExit(report_stop(e)) from None
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: list[str], resume: bool) -> None:
    if not argv:
        demo(resume=resume)
        return
    cfg, show = parse(argv)
    if show:
        print(yaml.safe_dump(cfg, sort_keys=False))
        return
    m = run(cfg, resume=resume)
    if is_main():  # several processes (DDP): one report
        print(json.dumps(m["test"], indent=2))
        print(f"trainable: {m['params']}; bundle: {cfg['output_dir']}/adapter; metrics: {cfg['output_dir']}/metrics.json")


if __name__ == "__main__":
    main()
