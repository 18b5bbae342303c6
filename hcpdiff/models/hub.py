"""Finding a model on the Hugging Face hub without waiting on retries: cache look-up and a reachability probe."""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import constants, try_to_load_from_cache

PROBE_TIMEOUT_S = 3.0


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a diffusers repo (it holds model_index.json), or None if not cached."""
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def offline_mode() -> bool:
    """True when the user forbade network access with HF_HUB_OFFLINE."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One DNS + TCP probe of the hub endpoint, bounded by `timeout_s` in total."""
    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: list[bool] = []

    def probe() -> None:
        try:
            # getaddrinfo ignores socket timeouts, hence the thread bounded by join() below
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])
