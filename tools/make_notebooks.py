"""Regenerate the tutorial notebooks from the cell sources below (outputs are produced by running them)."""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parent.parent


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    return nb


AUDIO = [
    ("md", """# Adapting an Audio Spectrogram Transformer with PEFT methods

This tutorial runs offline in a few minutes on a laptop CPU. It
1. writes a small synthetic dataset in the **ESC-50 layout** (`meta/esc50.csv` + `audio/*.wav`),
2. trains several PEFT methods from `domains/audio/methods/` on a small AST,
3. compares them in a table and an accuracy-vs-trainable-parameters plot,
4. predicts with a saved adapter bundle.

The AST here has **random weights** (no download), so the absolute accuracies say nothing about
the pretrained `MIT/ast-finetuned-audioset-10-10-0.4593`; swap `--model.backbone ast` and the
real ESC-50 folder in to reproduce PETL-AST (see the README)."""),
    ("code", """from pathlib import Path
import audio
from audio.synthetic import write_esc50_like

REPO = Path(audio.__file__).resolve().parent.parent
WORK = Path("runs/notebook_audio")
data = write_esc50_like(WORK / "esc50_synthetic", num_classes=4, clips_per_fold=4, seconds=1.0)
print(open(data / "meta" / "esc50.csv").read().splitlines()[:3])"""),
    ("md", """## Train four methods
Each run uses a dataset recipe plus a method recipe, overridden to the small random AST and
short clips. Every run writes `metrics.json` and an adapter bundle into its folder."""),
    ("code", """from audio.train import main as train

common = ["--config", str(REPO / "domains/audio/data/esc50.yaml"),
          "--data.root", str(data), "--data.target_frames", "100", "--data.num_workers", "0",
          "--data.cache_dir", str(WORK / "cache"), "--data.batch_size", "16",
          "--model.backbone", "tiny-ast",
          "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 64, layers: 2, heads: 4}",
          "--trainer.max_epochs", "8", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"]
rows = {}
for method, lr in [("linear", "1e-2"), ("bitfit", "1e-2"), ("lora", "1e-2"), ("adapter_bottleneck_pfeiffer_parallel", "1e-2")]:
    rows[method] = train(common + ["--config", str(REPO / f"domains/audio/methods/{method}.yaml"),
                                   "--model.lr", lr, "--output_dir", str(WORK / "runs" / method)])
{m: round(r["test/acc"], 3) for m, r in rows.items()}"""),
    ("md", "## Compare: table and plot (what `python -m audio.report` writes)"),
    ("code", """from IPython.display import Image, Markdown, display
from shared.report import collect, markdown, plot, summarise

summary = summarise(collect(WORK / "runs"), "test/acc")
plot(summary, "test/acc", WORK / "report.png")
display(Markdown(markdown(summary, "test/acc")))
display(Image(filename=str(WORK / "report.png")))
assert len(summary) == 4"""),
    ("md", "## Predict with a saved adapter bundle (what `python -m audio.predict` does)"),
    ("code", """from shared import peft
from audio.predict import frontend_config, predict

bundle = WORK / "runs" / "adapter_bottleneck_pfeiffer_parallel" / "adapter"
meta = peft.read_meta(bundle)
model = peft.from_bundle(bundle)   # rebuilds the backbone from the bundle's id, checks its fingerprint
clip = sorted((data / "audio").glob("1-*-A-2.wav"))[0]
for path, top in predict(model, frontend_config(meta), [str(clip)], top_k=3):
    print(path, top)
print(peft.summary(model))"""),
]

NOTEBOOKS = {"audio_adapters.ipynb": AUDIO}

if __name__ == "__main__":
    import sys

    from nbclient import NotebookClient

    for name, cells in NOTEBOOKS.items():
        nb = notebook(cells)
        if "--execute" in sys.argv:  # store outputs so readers see results without running it
            NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
        nbf.write(nb, ROOT / "notebooks" / name)
        print("wrote", ROOT / "notebooks" / name)
