"""Helpers the tests share that are not fixtures: builders of audio files, corpora and configs, and the
rules for optional packages. Fixtures live in `conftest.py`."""
