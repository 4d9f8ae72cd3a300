# Stages of training: data2vec pretraining per modality, fine-tuning per task, init and seed.


for stage in [s for kind in ("pretrain", "finetune",) for s in STAGES.of_kind(kind)]:

    rule:
        name:
            stage.name
        input:
            stage.deps,
        output:
            stage.outs,
        log:
            stage.log,
        benchmark:
            stage.log.replace("logs/", "benchmarks/", 1).removesuffix(".log") + ".tsv"
        params:
            cmd=stage.cmd,
            settings=STAGES.settings(stage),
        threads: stage.resources.threads
        priority: stage.priority
        resources:
            **stage.resources.snakemake(),
        conda:
            "../envs/d2v.yaml"
        shell:
            "{params.cmd} > {log} 2>&1"
