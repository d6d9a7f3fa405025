"""HuggingFace hub names (`gpt2`, `org/name`, `org/name@revision`) as local folders, and the lm
cache directory that keeps what lm makes of them.

Downloads go through `huggingface_hub`, so its cache ($HF_HOME, $HF_HUB_CACHE), its offline mode
($HF_HUB_OFFLINE=1) and its token ($HF_TOKEN, or `hf auth login`) apply as they do for transformers.
Only weights lm reads without unpickling code are fetched: safetensors, else pytorch_model*.bin
(read with torch.load(weights_only=True)); never other formats or extra files.

The lm cache directory is $LM_CACHE, else $XDG_CACHE_HOME/lm, else ~/.cache/lm (beside the
compilation cache's xla/ folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lm.config import ConfigError

# What lm reads of a model repo: config, tokenizer, generation settings, weights.
_COMMON = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
           "tokenizer.model"]
_SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
_PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]

# A repo id as the hub allows it (optionally org/), then an optional @revision (branch, tag, commit).
_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?)(@(?P<revision>[\w./-]+))?")


def cache_dir() -> Path:
    """Where lm keeps what it derives from downloads (imported hub models under hf/)."""
    if os.environ.get("LM_CACHE"):
        return Path(os.environ["LM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lm"


def is_hub_name(name: str | os.PathLike) -> bool:
    """A hub name rather than a local folder: no such path exists here and it reads as a repo id."""
    text = str(name)
    return not Path(text).expanduser().exists() and _NAME.fullmatch(text) is not None


def parse(name: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of `org/name@revision`."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ConfigError(f"{name!r} is neither a local folder nor a hub name such as gpt2 or "
                          f"org/name@revision")
    return match["repo"], match["revision"]


def download(name: str) -> Path:
    """The local snapshot folder of hub model `name` (its folder name is the commit), fetched into
    the HuggingFace cache if it is not there; a ConfigError naming the repo when it cannot be."""
    folder = _snapshot(name, _COMMON + _SAFETENSORS)
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        folder = _snapshot(name, _COMMON + _PICKLES)  # an older repo, without safetensors
    return folder


def _snapshot(name: str, patterns: list[str]) -> Path:
    repo, revision = parse(name)
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise ConfigError(f"hub name {name!r} needs the `huggingface_hub` package: pip install "
                          f"huggingface_hub (or pip install -e '.[hf]')") from None
    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision,
                                                      allow_patterns=patterns))
    except errors.HFValidationError as e:
        raise ConfigError(f"{name!r} is not a valid hub name ({_reason(e)})") from None
    except errors.RevisionNotFoundError:
        raise ConfigError(f"hub model {repo} has no revision {revision!r}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise ConfigError(f"hub model {repo} does not exist or needs access ({_reason(e)}); "
                          f"check the name, or set HF_TOKEN") from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:
        raise ConfigError(f"hub model {name} is neither in the HuggingFace cache "
                          f"({constants.HF_HUB_CACHE}) nor reachable "
                          f"({_reason(e)}); download it where the hub is reachable, or point "
                          f"HF_HOME at a cache that has it") from None


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
