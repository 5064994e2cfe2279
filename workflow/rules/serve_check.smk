# Serve-check stage: vLLM (its own interpreter, or an image through the container seam: serve_check.python /
# serve_check.image) loads merged/, and the adapter on its base when it is published, answers the evaluate stage's
# test prompts at temperature 0 and must give its answers (serve_check.tolerance). Runs in our environment, on the
# host or a GPU node like evaluate; vLLM is its subprocess. Off, or auto with no vLLM found: not a target, and the
# summary says why (README, Serving).


rule serve_check:
    input:
        model=lambda wildcards: model_out(of_run(wildcards), "model.json"),
        served=lambda wildcards: [
            out(of_run(wildcards), d)
            for d in served_dirs(of_run(wildcards)).values()
            if d
        ],
        samples=out(RUN, "eval", "samples.jsonl"),
        evaluate=out(RUN, "metrics", "evaluate.json"),
        eval=lambda wildcards: data_out(of_run(wildcards), "eval.jsonl"),
        test=lambda wildcards: data_out(of_run(wildcards), "test.jsonl"),
        script=script("serve_check"),
        code=code_inputs("serve_check"),
        # what vLLM's interpreter runs (not imported by ours, so not among the code inputs)
        engine=script("hpc_finetune/serve/engine"),
    output:
        metrics=out(RUN, "metrics", "serve_check.json"),
    log:
        out(RUN, "logs", "serve_check.log"),
    benchmark:
        out(RUN, "benchmarks", "serve_check.tsv")
    conda:
        "../envs/finetune.yaml"
    resources:
        **gpu_resources(of_run),
        # vLLM's interpreter: a resource, so that moving the project (the image's bind paths) re-runs nothing
        vllm=lambda wildcards: SERVE[wildcards.run].command,
    params:
        args=lambda wildcards: serve_check_args(of_run(wildcards)),
    shell:
        "python {input.script} --vllm={resources.vllm:q} {params.args} --model-json {input.model}"
        " --samples {input.samples} --evaluate-json {input.evaluate}"
        " --metrics-out {output.metrics} > {log} 2>&1"
