"""Audio: PETL for the Audio Spectrogram Transformer (this package) and the bioacoustic application
(`audio.birds`: Bird-MAE probes on BirdSet)."""
from shared.moved import install as _install_moved

_install_moved({"audio.bird_frontend": "audio.birds.frontend", "audio.bird_report": "audio.birds.report",
                "audio.bird_synthetic": "audio.birds.synthetic", "audio.birdmae": "audio.birds.birdmae",
                "audio.birdset": "audio.birds.birdset"})
