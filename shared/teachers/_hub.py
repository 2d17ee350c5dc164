"""Published teacher weights by tag (`clip:ViT-B-16@openai`, `dino:vit_base_patch16_224@dino`),
fetched through huggingface_hub without hanging where no hub is reachable.

A tag is first built from the local hub cache alone (huggingface_hub's offline mode: no
request). Only when that misses is the hub asked, and only after one TCP connection to it
(or to the HTTPS proxy) succeeded within `PROBE_SECONDS`: offline, huggingface_hub would
retry for about a minute and then fail with a message about the weights, not the network.
Offline, the tag fails at once in one line saying how to make a local weights file
(README "Teacher weights", `mrmae save-teacher`).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, TypeVar
from urllib.parse import urlsplit

from .base import TeacherError, TeacherSpec

PROBE_SECONDS = 3.0
T = TypeVar("T")


def hub_host() -> tuple[str, int]:
    """Where a download goes first: the HTTPS proxy if one is set, else HF_ENDPOINT's host
    (a mirror) or huggingface.co."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            url = urlsplit(os.environ[name] if "://" in os.environ[name] else f"http://{os.environ[name]}")
            return url.hostname or "", url.port or 3128
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


def hub_reachable() -> bool:
    """One TCP connection to `hub_host()`, no retries; False in huggingface_hub's offline mode."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(hub_host(), timeout=PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def from_hub(spec: TeacherSpec, build: Callable[[], T]) -> T:
    """`build()` (which fetches `spec`'s tagged weights through huggingface_hub), from the
    local cache if the weights are there, else from the hub if it answers, else one
    TeacherError saying the hub is out of reach and what to do instead."""
    import huggingface_hub.constants as hub

    was = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub: no request leaves this block
    logging.disable(logging.ERROR)  # open_clip logs the cache miss as an error of its own
    try:
        return build()
    except Exception:  # not in the cache (or a cached file that does not fit: the online build says so)
        pass
    finally:
        hub.HF_HUB_OFFLINE = was
        logging.disable(logging.NOTSET)
    if not hub_reachable():
        host = "HF_HUB_OFFLINE is set" if was else f"{hub_host()[0]} cannot be reached"
        raise TeacherError(f"teacher {spec}: the weights {spec.weights!r} are not in the local hub cache and {host}; "
                           f"make a local file where a hub is reachable (`mrmae save-teacher --teacher {spec} --out "
                           "DIR`, README \"Teacher weights\") and give the spec it prints")
    return build()
