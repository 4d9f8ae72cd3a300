# d2v pipeline: prepare → tokenizer → shard → pretrain → finetune → evaluate → report.
# The stages come from d2v/pipeline/stages.py, the same table `d2v pipeline dvc` writes dvc.yaml from.
#   snakemake --cores all                        # the active profile of params.yaml (embedded)
#   snakemake --cores all --config profile=smoke # another profile
#   snakemake --profile workflow/profiles/slurm  # a SLURM cluster
from snakemake.utils import min_version

from d2v.pipeline.params import load_params, read_params
from d2v.pipeline.stages import StageTable

min_version("9.0")


configfile: "params.yaml"


PARAMS = load_params("params.yaml", config.get("profile"))  # validated before any job runs
STAGES = StageTable(PARAMS, PARAMS.profile, raw=read_params("params.yaml"))


rule all:
    default_target: True
    input:
        STAGES.targets(),


include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
