"""`mrmae export --push-to-hub REPO`: upload an export folder to the Hugging Face Hub.

The folder is what `export` wrote (config.json + model.safetensors, timm's hub layout), so
`timm.create_model("hf-hub:REPO", pretrained=True)` reads it back. huggingface_hub does the
upload and finds the token where it always does (HF_TOKEN, `hf auth login`); nothing about
it goes on the command line. Whether the hub can be reached is asked once, before anything
is written, with one short connection: offline (HF_HUB_OFFLINE, no route, no name) is one
line at once, not huggingface_hub's retries.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from mrmae.shared.errors import MrmaeError

PROBE_TIMEOUT_S = 5.0


class HubError(MrmaeError, RuntimeError):
    """The hub cannot be reached or refused the upload (one line)."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT  # HF_ENDPOINT, else https://huggingface.co


def check_hub_reachable(repo: str) -> None:
    """HubError unless the hub's endpoint accepts a TCP connection within PROBE_TIMEOUT_S."""
    from huggingface_hub import constants

    endpoint = _endpoint()
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; export without --push-to-hub, then upload the "
                       f"folder where {endpoint} is reachable (hf upload {repo} FOLDER)")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise HubError(f"--push-to-hub {repo}: {endpoint} is not reachable from here ({e.strerror or e}); export "
                       f"without --push-to-hub, then upload the folder from a machine that reaches it "
                       f"(hf upload {repo} FOLDER)") from None


def push_folder(folder: Path, repo: str) -> str:
    """Create `repo` (a model repository, if it is not there) and upload `folder`; its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="mrmae export")
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"--push-to-hub {repo}: {first}") from None
    return f"{_endpoint()}/{repo_id}"
