"""Finding weights in the Hugging Face hub cache without touching the network.

Looking in the cache first means a cached teacher loads instantly even when the network is down: the hub
client would otherwise spend ~25 s per file in connection retries before falling back to the cache.
"""

from __future__ import annotations

from typing import Iterable


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: use caches only, no network attempts."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None when the hub endpoint answers; else why not. One request, no retries.

    Probing first turns a dead network into an immediate error instead of a minute of the hub client's
    retries; the request goes through the hub client's own session, so proxies and HF_ENDPOINT apply.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # any failure to get an answer means "unreachable"; the caller reports it
        return f"{type(error).__name__}: {error}"
    return None


def why_no_download() -> str | None:
    """None when a hub download may be attempted; else the reason not to (offline mode, hub unreachable)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set: no download attempted"
    reason = hub_unreachable()
    if reason is not None:
        from huggingface_hub import constants

        return f"the hub ({constants.ENDPOINT}) cannot be reached, so no download was attempted: {reason}"
    return None


def cached_hub_file(repo_id: str, filenames: Iterable[str], cache_dir: str | None = None) -> str | None:
    """Path of the first of ``filenames`` of ``repo_id`` present in the hub cache, or None. No network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def safetensors_first(filename: str) -> list[str]:
    """``filename`` preceded by its .safetensors twin, the order the hub loaders of timm and open_clip try."""
    if filename.endswith((".bin", ".pth")):
        twin = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else filename[:-4] + ".safetensors"
        return [twin, filename]
    return [filename]
