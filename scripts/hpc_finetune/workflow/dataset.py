"""What the data stage (and the demo model's tokenizer) reads, decided when Snakemake starts: dataset.path itself,
or, for a dataset in a bucket, the cache directory named after the objects listed now (hpc_finetune.data.remote)
that rule fetch_dataset fills. Listing errors are ConfigErrors, so the workflow stops before any job runs.

Jobs that Snakemake runs in processes of their own (a Slurm job re-reads the workflow on a compute node, which may
have no route to the store) use the listing the main process saved in `state_dir`, so they plan what it planned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hpc_finetune.workflow.config import ConfigError
from hpc_finetune.workflow.paths import local_dataset


@dataclass(frozen=True)
class DatasetInput:
    path: str  # what the stages read (--path / --data)
    inputs: list[str]  # rule inputs: the local file or directory, the fetched cache, or nothing (a hub name)
    origin: str | None = None  # the fetch record (rule fetch_dataset), for the data report
    fetch: dict | None = None  # rule fetch_dataset: source, output, record, endpoint, region


def saved_path(state_dir: str, where: list) -> Path:
    return Path(state_dir) / f"dataset-{hashlib.sha256(json.dumps(where).encode()).hexdigest()[:16]}.json"


def planned(state_dir: str, where: list, main_process: bool, ask) -> dict | None:
    """What the main process asks once (ask() -> a dict, StageErrors become ConfigErrors), saved in state_dir under
    `where` for the job processes, which read it back; None in a job process when the main one saved nothing."""
    from hpc_finetune.io.cli import StageError
    from hpc_finetune.io.files import write_json

    saved = saved_path(state_dir, where)
    if not main_process:
        return json.loads(saved.read_text()) if saved.is_file() else None
    try:
        answer = ask()
    except StageError as err:
        raise ConfigError(str(err)) from None
    write_json(saved, answer)
    return answer


def check_local_path(path: str) -> None:
    """A dataset.path that can only mean a file or directory on disk (absolute, or with a file suffix) must exist
    when Snakemake starts; otherwise the dry run would plan and the data stage fail later. A name that is neither
    (org/name, data/train.jsonl excepted) is a hub dataset."""
    from hpc_finetune.data.readers import FILE_TYPES
    from hpc_finetune.hub.request import MODEL_ID

    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    file_like = local.is_absolute() or suffix in FILE_TYPES or (suffix and not MODEL_ID.fullmatch(path))
    if file_like and not local.exists():
        where = f" (relative to {Path.cwd()}, where Snakemake runs)" if not local.is_absolute() else ""
        raise ConfigError(f"config key dataset.path: {path} does not exist{where}; point it at a "
                          f"{'/'.join(FILE_TYPES)} file, a directory of one, or a hub dataset name org/name")


def dataset_input(cfg: dict, state_dir: str = ".snakemake/hpc_finetune", main_process: bool = True) -> DatasetInput:
    ds = cfg["dataset"]
    from hpc_finetune.data import hub

    if not ds["path"].startswith("s3://"):
        check_local_path(ds["path"])
    if hub.is_hub_dataset(ds["path"]):
        return hub_input(cfg, state_dir, main_process)
    if not ds["path"].startswith("s3://"):
        return DatasetInput(ds["path"], local_dataset(ds["path"]))
    from hpc_finetune.data import remote
    from hpc_finetune.io.cli import StageError

    def ask() -> dict:
        try:
            return asdict(remote.list_s3(ds["path"], ds["s3_endpoint"], ds["s3_region"]))
        except StageError as err:
            raise StageError(f"dataset.path {ds['path']}: {err}" if "dataset.path" not in str(err) else str(err)) \
                from None

    where = [ds["path"], ds["s3_endpoint"], ds["s3_region"]]
    saved = planned(state_dir, where, main_process, ask)
    if saved is None:
        raise ConfigError(f"{saved_path(state_dir, where)}: no listing of {ds['path']} from the main Snakemake process (start the "
                          "workflow again from the directory it runs in)")
    listing = remote.Listing(**saved)
    cache = listing.cache(ds["cache_dir"])
    fetch = {"kind": "s3", "source": ds["path"], "output": cache, "record": f"{cache}.json",
             "endpoint": ds["s3_endpoint"], "region": ds["s3_region"]}
    return DatasetInput(listing.data_path(ds["cache_dir"]), [cache], f"{cache}.json", fetch)


def hub_input(cfg: dict, state_dir: str, main_process: bool) -> DatasetInput:
    """A hub dataset: the commit dataset.revision names (asked when the main process starts, saved for the jobs;
    a job without the saved answer asks itself), its snapshot in the shared cache, and the fetch that fills it."""
    from hpc_finetune.data import hub
    from hpc_finetune.hub.request import read_token

    ds = cfg["dataset"]

    def ask() -> dict:
        token = read_token(cfg["model"]["token_file"], f"dataset {ds['path']}")
        return asdict(hub.resolve(ds["path"], ds["revision"], ds["hub_url"], ds["cache_dir"], token))

    where = [ds["path"], ds["revision"], ds["hub_url"]]
    pinned = hub.Pinned(**(planned(state_dir, where, main_process, ask) or planned(state_dir, where, True, ask)))
    snapshot, record = pinned.snapshot(ds["cache_dir"]), pinned.record(ds["cache_dir"])
    fetch = {"kind": "hf", "source": f"hf://datasets/{pinned.repo_id}", "output": snapshot, "record": record,
             "revision": pinned.revision, "commit": pinned.commit, "hub_url": ds["hub_url"],
             "cache_dir": ds["cache_dir"], "token_file": cfg["model"]["token_file"]}
    return DatasetInput(snapshot, [record], record, fetch)


def dataset_key(cfg: dict) -> str:
    return json.dumps([cfg["dataset"], cfg["model"]["token_file"]], sort_keys=True)


def dataset_inputs(runs: dict[str, dict], state_dir: str = ".snakemake/hpc_finetune",
                   main_process: bool = True) -> dict[str, DatasetInput]:
    """dataset_input of every distinct dataset of an experiment's runs: a bucket is listed, a hub revision asked,
    once per dataset, not once per run. Runs may vary local datasets freely; one remote dataset (a bucket or hub
    dataset, whose rule fetch_dataset is one) per experiment."""
    inputs: dict[str, DatasetInput] = {}
    for cfg in runs.values():
        key = dataset_key(cfg)
        if key not in inputs:
            inputs[key] = dataset_input(cfg, state_dir, main_process)
    fetches = {json.dumps(i.fetch, sort_keys=True) for i in inputs.values() if i.fetch}
    if len(fetches) > 1:
        raise ConfigError("config key dataset.path: the runs read more than one dataset from a bucket or the hub; "
                          "an experiment fetches one remote dataset (vary local datasets, or run the others apart)")
    return inputs


def data_input(inputs: dict[str, DatasetInput], cfg: dict) -> DatasetInput:
    """The DatasetInput of the run (or shared stage) `cfg`."""
    return inputs[dataset_key(cfg)]
