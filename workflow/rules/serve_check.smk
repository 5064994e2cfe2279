# Serve-check stage: vLLM (its own interpreter, or an image through the container seam: serve_check.python /
# serve_check.image) loads merged/, and the adapter on its base when it is published, answers the evaluate stage's
# test prompts at temperature 0 and must give its answers (serve_check.tolerance). Runs in our environment, on the
# host or a GPU node like evaluate; vLLM is its subprocess. Off, or auto with no vLLM found: not a target, and the
# summary says why (README, Serving).


rule serve_check:
    input:
        model=out(config, "model", "model.json"),
        served=[out(config, d) for d in served_dirs(config).values() if d],
        samples=out(config, "eval", "samples.jsonl"),
        evaluate=out(config, "metrics", "evaluate.json"),
        eval=out(config, "data", "eval.jsonl"),
        test=out(config, "data", "test.jsonl"),
        script=script("serve_check"),
        code=code_inputs("serve_check"),
        # what vLLM's interpreter runs (not imported by ours, so not among the code inputs)
        engine=script("hpc_finetune/serve/engine"),
    output:
        metrics=out(config, "metrics", "serve_check.json"),
    log:
        out(config, "logs", "serve_check.log"),
    benchmark:
        out(config, "benchmarks", "serve_check.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        # vLLM's interpreter: a resource, so that moving the project (the image's bind paths) re-runs nothing
        vllm=SERVE.command,
        mem_mb=scaled(config, RESOURCES["gpu_mem_mb"]),
        runtime=scaled(config, RESOURCES["gpu_runtime"]),
        gpu=RESOURCES["gpus"],
    params:
        args=stage_args(
            **pick(
                config["serve_check"],
                "num_prompts",
                "tolerance",
                "dtype",
                "max_model_len",
                "enforce_eager",
            ),
            **{k: d and out(config, d) for k, d in served_dirs(config).items()},
            data_dir=out(config, "data"),
        ),
    shell:
        "python {input.script} --vllm={resources.vllm:q} {params.args} --model-json {input.model}"
        " --samples {input.samples} --evaluate-json {input.evaluate}"
        " --metrics-out {output.metrics} > {log} 2>&1"
