"""Whether the serve_check stage runs, with which vLLM, and on what (config serve_check:, README "Serving"): the
command that starts vLLM's interpreter (a path or command, or `apptainer exec ... <image> python3` through the
stages' container seam), or why the stage is skipped. Read at parse time (rules, paths) and by the summary."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hpc_finetune.workflow.config import ConfigError
from hpc_finetune.workflow.container import container_command

ON, OFF = (True, "on"), (False, "off")


@dataclass(frozen=True)
class ServePlan:
    on: bool
    command: str = ""  # vLLM's interpreter, as a shell command
    reason: str = ""  # why it is skipped (on: empty)


def _vllm_command(cfg: dict) -> tuple[str, str]:
    """(command, "") or ("", what is missing)."""
    sc = cfg["serve_check"]
    if sc["image"]:
        image = Path(sc["image"]).expanduser()
        if not image.is_file():
            return "", f"serve_check.image {sc['image']} does not exist"
        runtime = cfg["container"]["runtime"]
        if runtime not in ("apptainer", "singularity"):  # none, or charliecloud (its images are not SIFs)
            runtime = next((r for r in ("apptainer", "singularity") if shutil.which(r)), "none")
        if runtime == "none" or not shutil.which(runtime):
            return "", "serve_check.image needs apptainer or singularity on PATH (container.runtime)"
        return container_command(cfg, runtime, str(image)) + (sc["python"] or "python3"), ""
    if not sc["python"]:
        return "", "no vLLM configured (serve_check.python or serve_check.image)"
    python = sc["python"]
    if "/" in python:
        found = Path(python).expanduser()
        if not found.is_file():
            return "", f"serve_check.python {python} does not exist"
        return str(found.absolute()), ""
    if not shutil.which(python):
        return "", f"serve_check.python {python} is not on PATH"
    return python, ""


def serve_plan(cfg: dict) -> ServePlan:
    """The serve_check stage's plan; raises ConfigError when it is on but cannot run."""
    enabled = cfg["serve_check"]["enabled"]
    if enabled in OFF:
        return ServePlan(False, reason="serve_check.enabled is off")
    if not cfg["evaluate"]["enabled"]:
        if enabled in ON:
            raise ConfigError("config key serve_check.enabled: on needs evaluate.enabled (vLLM's answers are compared "
                              "with the evaluate stage's); turn evaluate on or serve_check off")
        return ServePlan(False, reason="the evaluate stage is off (its answers are what vLLM's are compared with)")
    command, missing = _vllm_command(cfg)
    if not command:
        if enabled in ON:
            raise ConfigError(f"config key serve_check.enabled: on, but {missing}. Point serve_check.python at "
                              "vLLM's interpreter or serve_check.image at an image with vLLM (README, Serving), "
                              "or set serve_check.enabled auto")
        return ServePlan(False, reason=missing)
    return ServePlan(True, command=command)


def check_adapter(cfg: dict) -> bool:
    """Whether vLLM also serves the adapter on its base: when it is the final model (no merge) or published
    (hub_upload.publish adapter, or upload.include adapters with a bucket)."""
    hub, upload = cfg["hub_upload"], cfg["upload"]
    return (not cfg["merge"]["merge_full_weights"] or bool(hub["repo_id"] and "adapter" in hub["publish"])
            or bool(upload["bucket"] and "adapters" in upload["include"]))


def evaluate_engine(cfg: dict) -> tuple[str, str]:
    """(engine, vLLM command) the evaluate stage generates with: evaluate.engine, auto resolved to vllm when
    serve_check.python / serve_check.image names a vLLM that is there (whether or not serve_check runs)."""
    engine = cfg["evaluate"]["engine"]
    if engine == "transformers":
        return "transformers", ""
    command, missing = _vllm_command(cfg)
    if command and cfg["serve_check"]["image"] and cfg["container"]["runtime"] != "none":
        command, missing = "", ("the evaluate stage runs inside container.image, and vLLM's image cannot be started "
                                "from inside it (use serve_check.python: a vLLM interpreter the image sees through "
                                "container.binds)")
    if engine == "vllm" and not command:
        raise ConfigError(f"config key evaluate.engine: vllm, but {missing}. Point serve_check.python at vLLM's "
                          "interpreter or serve_check.image at an image with vLLM (README, Serving)")
    return ("vllm", command) if command else ("transformers", "")



def served_dirs(cfg: dict) -> dict[str, str | None]:
    """The serve_check stage's --merged and --adapter as run directories' names: merged (when merging is on) and
    adapters (check_adapter); None: not served."""
    return {"merged": "merged" if cfg["merge"]["merge_full_weights"] else None,
            "adapter": "adapters" if check_adapter(cfg) else None}

def serve_skipped(cfg: dict) -> str:
    """Why the run has no serve check (the summary's line), for a run whose serve_check stage did not run."""
    try:
        plan = serve_plan(cfg)
    except ConfigError as err:
        return str(err)
    return plan.reason or "serve_check ran in another invocation"
