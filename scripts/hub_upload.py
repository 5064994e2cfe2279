"""Hub upload stage (optional): publish the adapter and/or the merged model to the Hugging Face Hub, each with a
generated model card.

    HF_TOKEN=... python scripts/hub_upload.py --repo-id my-org/medqa-lora --adapters results/demo/adapters \
        --merged results/demo/merged --manifest results/demo/manifest.json --model-json results/demo/model/model.json \
        --data-report results/demo/data/report.json --evaluate results/demo/metrics/evaluate.json \
        --record-out results/demo/hub_upload.json

The adapter goes to --repo-id, the merged model to <repo-id>-merged: two model repositories, because a
repository is loaded from its root (vLLM, transformers, PEFT) and each needs its own card and library_name. Both
on --revision (a branch; created when missing). A branch ends up holding exactly the run's files and the card:
files the Hub already holds unchanged are not sent again, files the run no longer has are deleted, and an
interrupted upload completes on the next run. The record lists each repository's commit and every file with its
sha256. The token: --token-file, else HF_TOKEN; it needs write access and is never logged or written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import read_json, write_json
from hpc_finetune.io.schema import option

NOT_PUBLISHED = {"README.md", "training_args.bin"}  # replaced by the card; a pickle with local paths


@dataclass
class Config:
    repo_id: str = field(metadata={"help": "namespace/name of the adapter's repository"})
    manifest: str = field(metadata={"help": "manifest.json of the summary stage"})
    model_json: str = field(metadata={"help": "model.json of the model stage (the base, its license)"})
    data_report: str = field(metadata={"help": "report.json of the data stage (the card's data counts)"})
    record_out: str = field(metadata={"help": "hub_upload.json to write"})
    adapters: str | None = field(default=None, metadata={"help": "adapter directory to publish"})
    merged: str | None = field(default=None, metadata={"help": "merged model directory to publish"})
    evaluate: str | None = field(default=None, metadata={"help": "evaluate.json (the card's base-vs-fine-tuned table)"})
    private: bool = option("hub_upload.private")
    revision: str = option("hub_upload.revision")
    commit_message: str | None = option("hub_upload.commit_message")
    token_file: str | None = option("hub_upload.token_file")
    endpoint: str | None = option("hub_upload.endpoint")
    retries: int = option("hub_upload.retries")
    retry_wait_s: float = option("hub_upload.retry_wait_s")


def targets(cfg: Config, cards) -> list:
    from hpc_finetune.hub.publish import Target
    from hpc_finetune.merge.adapter import check_servable_adapter

    chosen = [(kind, repo, directory) for kind, repo, directory in (
        ("adapter", cfg.repo_id, cfg.adapters), ("merged", f"{cfg.repo_id}-merged", cfg.merged)) if directory]
    if not chosen:
        raise StageError("hub upload: nothing to publish (give --adapters and/or --merged)")
    found = []
    for kind, repo, directory in chosen:
        root = Path(directory)
        if not root.is_dir():
            raise StageError(f"{root}: no such directory to publish (run the stage that makes it first)")
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.relative_to(root).as_posix() not in NOT_PUBLISHED}
        if kind == "adapter":
            check_servable_adapter(root)
        pair = next((r for k, r, _ in chosen if k != kind), None)
        found.append(Target(kind, repo, files, {"README.md": cards(kind, repo, pair).encode()}))
    return found


def main(cfg: Config) -> dict:
    from hpc_finetune.hub.card import base_license, model_card
    from hpc_finetune.hub.publish import check_token, ensure_repo, publish, with_retries
    from hpc_finetune.hub.request import hub_endpoint, read_token
    from huggingface_hub import HfApi, constants

    started = time.time()
    endpoint = hub_endpoint(cfg.endpoint)
    token = read_token(cfg.token_file, f"hub upload to {cfg.repo_id}", "hub_upload.token_file")
    if not token:
        raise StageError(f"hub upload to {cfg.repo_id}: no Hub token. Export HF_TOKEN=<a token with write access> "
                         "where Snakemake runs (the upload runs on that host), or set hub_upload.token_file")
    if constants.is_offline_mode():
        raise StageError(f"hub upload to {cfg.repo_id}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set where "
                         "Snakemake runs, and the upload needs the network: unset it for the run that uploads")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request drowns the progress
    manifest = read_json(cfg.manifest, "manifest")
    model = read_json(cfg.model_json, "model record")
    report = read_json(cfg.data_report, "data report")
    evaluate = read_json(cfg.evaluate, "evaluate metrics") if cfg.evaluate else None
    license_ = base_license(Path(model["path"])) if model.get("path") else None

    def card(kind: str, repo: str, pair: str | None) -> str:
        return model_card(kind, repo, manifest, model, report, evaluate, license_, pair)

    chosen = targets(cfg, card)
    message = cfg.commit_message or (f"hpc-finetune run {manifest.get('run_name')}: {{what}} (project commit "
                                     f"{(manifest.get('workflow_commit') or 'unknown')[:12]})")
    api = HfApi(endpoint=endpoint, token=token, library_name="hpc-finetune")
    retry = {"endpoint": endpoint, "retries": cfg.retries, "wait_s": cfg.retry_wait_s}
    who = with_retries(lambda: check_token(api, endpoint), "hub upload: checking the token", **retry)
    log.info("publishing to %s as %s: %s", endpoint, who.get("name"), ", ".join(t.repo_id for t in chosen))
    repos = []
    for target in chosen:
        what = f"hub upload of the {target.kind} to {target.repo_id}"
        text = message.replace("{what}", "adapter" if target.kind == "adapter" else "merged model")

        def upload(target=target, text=text) -> dict:
            ensure_repo(api, target.repo_id, cfg.private, cfg.revision, endpoint)
            return publish(api, target, cfg.revision, text)

        repos.append(with_retries(upload, what, **retry))
    seconds = time.time() - started
    record = {"endpoint": endpoint, "user": who.get("name"), "repos": repos, "seconds": round(seconds, 2)}
    write_json(cfg.record_out, record)
    log.info("\n%s", table([(f"{r['repo']}@{r['revision']}", f"commit {r['commit'][:12]}, "
                             f"{sum(f['action'] == 'uploaded' for f in r['files'])} of {len(r['files'])} files sent "
                             f"({r['uploaded_bytes'] / 2**20:,.1f} MiB), {len(r['deleted'])} deleted")
                            for r in repos] + [("time", f"{seconds:.1f} s")], "Hub upload"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
