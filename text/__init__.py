"""Personalised jargon detection: data layouts (PersonalizedJargon, JSONL, ACTER), an encoder BIO
tagger with PEFT methods (`python -m text.train`), a generative yes / no path with per-reader LoRA
(`text.generative`), prediction (`python -m text.predict`) and reports (`python -m text.report`)."""
