"""What the model stage asks the hub cache for (model_id@revision at a hub URL, the token, the cache) and the
token itself, read from model.token_file or HF_TOKEN and never logged.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError

FULL_SHA = re.compile(r"[0-9a-f]{40}")
SHORT_SHA = re.compile(r"[0-9a-f]{7,39}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
REVISION = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/+-]*")
TOKEN = re.compile(r"[\x21-\x7e]+")
DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint(url: str | None) -> str:
    """The Hub that huggingface_hub talks to: `url` (a config key), else HF_ENDPOINT, else huggingface.co."""
    return (url or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class Request:
    model_id: str
    revision: str
    hub_url: str
    cache_dir: Path
    token: str | None = field(default=None, repr=False)
    update: bool = False
    min_free_bytes: int = 0

    @property
    def label(self) -> str:
        return f"{self.model_id}@{self.revision}"

    @property
    def url(self) -> str:
        return f"{self.hub_url.rstrip('/')}/{self.model_id}"

    @property
    def root(self) -> Path:
        return self.cache_dir / self.model_id


def read_token(token_file: str | None, what: str, key: str = "model.token_file") -> str | None:
    """The hub token: the contents of `token_file` (the config key `key`) when set, else HF_TOKEN. Errors start
    with `what`; the value is never logged."""
    if not token_file:
        return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    path = Path(os.path.expandvars(token_file)).expanduser()
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(
            f"{what}: {key} {path} cannot be read ({getattr(err, 'strerror', None) or err}); "
            "point it at a file that holds your hub token, or unset it and export HF_TOKEN"
        ) from None
    if not TOKEN.fullmatch(token):
        raise StageError(
            f"{what}: {key} {path} is empty or holds more than one token (spaces or control "
            "characters); write the token alone into it"
        )
    return token


def check_request(req: Request) -> None:
    """The id and revision become cache paths: refuse what could escape the cache or collide."""
    if not MODEL_ID.fullmatch(req.model_id or ""):
        raise StageError(
            f"model.model_id {req.model_id!r} is not a hub id org/name (e.g. meta-llama/Llama-3.1-8B-Instruct); "
            "use the full id shown on the model's hub page"
        )
    if not REVISION.fullmatch(req.revision or ""):
        raise StageError(
            f"model {req.model_id}: model.revision {req.revision!r} is not a branch, tag or commit name; set it to "
            "one (e.g. main, v1.0 or a commit SHA)"
        )
    url = urllib.parse.urlsplit(req.hub_url)
    if url.scheme not in ("https", "http", "file"):
        raise StageError(
            f"model {req.model_id}: model.hub_url {req.hub_url!r} is not an https://, http:// or file:// URL"
        )
    if url.username or url.password:
        raise StageError(
            f"model {req.model_id}: model.hub_url holds credentials; remove them and give the token through "
            "HF_TOKEN or model.token_file, which never reach the cache's git config"
        )


