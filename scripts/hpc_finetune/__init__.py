"""hpc-finetune's library: what the stage programs in scripts/ are made of, one concern per sub-package.

    io         command line, logging, files, measurements, the config schema's defaults
    data       dataset sources and formats, cleaning, the rendering of rows as training sees them
    model      weight files, the model record, loading for merge and evaluation, portability, the demo model
    hub        the git-lfs model cache
    train      trainer setup, checkpoints and signals, speed levers, 4-bit layers, the fingerprint, preflight
    merge      adapter checks, merging (in memory and streaming), the logit check, saving
    evaluate   scoring and generation
    serve      vLLM in a process of its own: the engine it runs, starting it, the serve check, evaluate's vLLM answers
    summary    the manifest and training.env
    container  SIF images and their sources
    storage    the S3-protocol client
    workflow   what the Snakefile uses: config resolution, paths and arguments, Slurm placement, the container
               command line, the code inputs of each rule
    code       a program's import closure (rule inputs and the training fingerprint)
    git        running git

The developer tools (the benchmarks, the GPU check) live beside it in scripts/tools/: nothing here imports them.
Nothing here imports torch or transformers at module level: heavy imports sit inside the functions that need them.
"""
