"""The bioacoustic application: Bird-MAE with frozen-backbone probes (linear, attentive,
prototypical) on BirdSet, few-shot included.

- `frontend`: Bird-MAE's 32 kHz kaldi fbank and the 5 s evaluation windows;
- `birdmae`: the Bird-MAE backbone (timm ViT, one input channel) and its checkpoint filter;
- `birdset`: the BirdSet data module (focal training clips, multi-label soundscape windows);
- `synthetic`: bird-like demo data and FSDD soundscapes in the BirdSet layout;
- `probe`: `python -m audio.probe`, the probe runner; `explain`: `python -m audio.explain`;
- `report`: the test-set x probe-kind table.
"""
