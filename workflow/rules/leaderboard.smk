# Leaderboard stage (experiments: runs:/sweep:, README "Experiments"): one row per run and per base-only entry,
# the settings that vary, base and fine-tuned metrics with the difference, cost, and the best run by
# experiment.metric and experiment.direction (scripts/leaderboard.py). On the host: it reads metrics files only.

if EXPERIMENT:

    rule leaderboard:
        input:
            metrics=leaderboard_inputs(RUNS),
            script=script("leaderboard"),
            code=code_inputs("leaderboard"),
        output:
            csv=f"{OUT}/leaderboard/leaderboard.csv",
            md=f"{OUT}/leaderboard/leaderboard.md",
            # the report's first page when there are several runs (category 0)
            html=report(
                f"{OUT}/leaderboard/leaderboard.html",
                category="0. Leaderboard",
                caption="../report/leaderboard.rst",
                labels={"page": "leaderboard"},
            ),
            figures=report(
                directory(f"{OUT}/leaderboard/figures"),
                patterns=["{figure}.png"],
                category="0. Leaderboard",
                caption="../report/leaderboard.rst",
                labels={"figure": "{figure}"},
            ),
        log:
            f"{OUT}/leaderboard/leaderboard.log",
        localrule: True
        conda:
            "../envs/finetune.yaml"
        params:
            entries=json.dumps(leaderboard_entries(RUNS), sort_keys=True),
            args=stage_args(**pick(config["experiment"], "metric", "direction")),
        shell:
            "python {input.script} --entries {params.entries:q} {params.args} --out-csv {output.csv}"
            " --out-md {output.md} --out-html {output.html} --figures-dir {output.figures} > {log} 2>&1"
