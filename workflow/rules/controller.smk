# The run's controller (hpc_finetune.workflow.controller; README, "Re-running only what changed"). Only in the main
# Snakemake process: the jobs' own re-parses (Slurm jobs, script subprocesses) do none of it.
# - parse time: leftovers of killed jobs beside a finished deliverable removed, a deliverable directory that lost
#   files the manifest lists set aside (so it is rebuilt), unless a live controller holds the run;
# - onstart (only a run that executes jobs: not a dry run, --unlock, --lint, --report): first, with the slurm
#   executor on a cluster without job accounting (sacct fails), the run would hang silently after the first job:
#   say so and stop before anything is submitted or written (README, "Running on a cluster"); then the run's own
#   lock, held until the process ends, or a clear refusal when another controller holds it;
# - exit (every invocation): the manifest compared with the disk; a run that leaves files it lists missing
#   says which and how to rebuild them, and exits non-zero.

# One controller per run (an experiment's runs each have their directory, manifest and lock).
if workflow.is_main_process:
    CONTROLLERS = [
        Controller(out(cfg), list(ARTIFACTS[name].values()), workflow)
        for name, cfg in TRAINED.items()
    ]
    for _controller in CONTROLLERS:
        _controller.at_parse()
        atexit.register(_controller.at_exit)


# The workflow's only onstart handler: Snakemake keeps the last one defined (tests/test_controller.py checks it).
onstart:
    _problem = status_command_problem(
        workflow.executor_plugin.name if workflow.executor_plugin else None,
        getattr(workflow.executor_settings, "status_command", None),
    )
    if _problem:
        sys.exit(_problem)
    if workflow.is_main_process:
        try:
            for _controller in CONTROLLERS:
                _controller.on_start()
        except RunInUse as err:
            raise WorkflowError(str(err)) from None
