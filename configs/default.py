"""The shared defaults (lm/config.py holds every field and its meaning)."""

from lm.config import default_config


def get_config():
    return default_config()
