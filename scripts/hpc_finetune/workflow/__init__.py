"""What the Snakefile uses: config resolution, paths and arguments, Slurm placement, the container command line."""
