"""What the Snakefile uses: config resolution, paths and arguments, the dataset to read, Slurm placement, the container command line."""
