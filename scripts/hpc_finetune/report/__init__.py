"""The run report: training curves, resource use, data, evaluation and timings as figures and HTML pages for
`snakemake --report` (the plots stage)."""
