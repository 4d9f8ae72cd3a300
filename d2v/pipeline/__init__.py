"""The pipeline layer: params.yaml profiles, the stage table behind Snakemake and DVC, and the report."""
