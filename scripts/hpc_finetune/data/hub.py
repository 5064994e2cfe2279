"""Hub datasets at a pinned revision: `dataset.path: org/name` with `dataset.revision` (a branch, tag or commit).

The workflow resolves the revision to a commit when it starts (resolve: one repo-info call; a commit needs none;
without the network, the commit the cache recorded for that revision), so a moved branch or a changed revision
re-runs data preparation, and the data stage reads one fixed snapshot. The fetch stage downloads that commit with
`snapshot_download` into the shared Hugging Face cache under {dataset.cache_dir}/hub (files shared between
revisions and runs) on the host that has the network; the data stage reads the snapshot as a local directory laid
out as a dataset repository. The token (HF_TOKEN or model.token_file) is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpc_finetune.hub.request import FULL_SHA, MODEL_ID, hub_endpoint
from hpc_finetune.io.cli import StageError, log


def is_hub_dataset(path: str) -> bool:
    """org/name, and no such local path (repository ids are named as the model stage's)."""
    return bool(MODEL_ID.fullmatch(path)) and not Path(path).expanduser().exists()


@dataclass
class Pinned:
    repo_id: str
    revision: str
    commit: str
    endpoint: str

    def repo_dir(self, cache_dir: str) -> str:
        return f"{cache_dir.rstrip('/')}/hub/datasets--{self.repo_id.replace('/', '--')}"

    def snapshot(self, cache_dir: str) -> str:
        """Where snapshot_download puts this commit (the Hugging Face cache layout)."""
        return f"{self.repo_dir(cache_dir)}/snapshots/{self.commit}"

    def record(self, cache_dir: str) -> str:
        return f"{self.repo_dir(cache_dir)}/{self.commit}.json"


def cached_commit(repo_id: str, revision: str, cache_dir: str) -> str | None:
    ref = Path(cache_dir).expanduser() / "hub" / f"datasets--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def resolve(repo_id: str, revision: str, hub_url: str | None, cache_dir: str, token: str | None) -> Pinned:
    """The commit `revision` names now; StageErrors name the key to fix."""
    endpoint = hub_endpoint(hub_url)
    if FULL_SHA.fullmatch(revision):
        return Pinned(repo_id, revision, revision, endpoint)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint, token=token or False).dataset_info(repo_id, revision=revision)
        return Pinned(repo_id, revision, info.sha, endpoint)
    except RevisionNotFoundError:
        raise StageError(f"dataset.revision {revision!r}: no such branch, tag or commit in the dataset {repo_id} "
                         f"on {endpoint}") from None
    except RepositoryNotFoundError:
        raise StageError(f"dataset.path {repo_id}: no such dataset on {endpoint}, or it is private or gated: give a "
                         "token that may read it (HF_TOKEN or model.token_file)") from None
    except Exception as err:  # noqa: BLE001 - offline or unreachable: the cache may know the commit
        known = cached_commit(repo_id, revision, cache_dir)
        offline = isinstance(err, OfflineModeIsEnabled)
        if known is None:
            raise StageError(
                f"dataset.path {repo_id}@{revision}: cannot ask {endpoint} which commit that is "
                f"({'HF_HUB_OFFLINE is set' if offline else f'{type(err).__name__}: {err}'}) and the cache "
                f"({cache_dir}/hub) has never fetched it: run once where the hub is reachable, or pin "
                "dataset.revision to a commit that is in the cache") from None
        log.warning("dataset %s@%s: %s unreachable (%s); using the commit the cache recorded, %s", repo_id,
                    revision, endpoint, type(err).__name__, known[:12])
        return Pinned(repo_id, revision, known, endpoint)


def fetch(pinned: Pinned, cache_dir: str, token: str | None) -> dict:
    """Download the pinned commit into the cache; the record of its files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        local = snapshot_download(pinned.repo_id, repo_type="dataset", revision=pinned.commit,
                                  cache_dir=f"{cache_dir.rstrip('/')}/hub", endpoint=pinned.endpoint,
                                  token=token or False)
    except (HfHubHTTPError, OSError) as err:
        raise StageError(f"dataset {pinned.repo_id}@{pinned.commit[:12]}: the download from {pinned.endpoint} "
                         f"failed ({type(err).__name__}: {str(err).splitlines()[0]}); run again (files already "
                         "fetched are kept)") from None
    if Path(local).resolve() != Path(pinned.snapshot(cache_dir)).expanduser().resolve():
        raise StageError(f"dataset {pinned.repo_id}: snapshot_download put commit {pinned.commit} at {local}, not at "
                         f"{pinned.snapshot(cache_dir)}")
    if pinned.revision != pinned.commit:  # what the revision named, for a later start without the network
        ref = Path(pinned.repo_dir(cache_dir)).expanduser() / "refs" / pinned.revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(pinned.commit)
    files = [{"path": p.relative_to(local).as_posix(), "bytes": p.stat().st_size}
             for p in sorted(Path(local).rglob("*")) if p.is_file()]
    return {"url": f"hf://datasets/{pinned.repo_id}", "kind": "hub", "repo_id": pinned.repo_id,
            "revision": pinned.revision, "commit": pinned.commit, "endpoint": pinned.endpoint, "objects": files,
            "bytes": sum(f["bytes"] for f in files)}
