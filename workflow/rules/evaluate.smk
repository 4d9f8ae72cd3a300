# Stages of evaluation: the word n-gram LM that CTC beam search decodes with, one JSON per test split (of each fine-tuned model and of each raw-feature baseline), then the
# summary tables and plots.


for stage in [s for kind in ("lm", "evaluate", "baseline", "report") for s in STAGES.of_kind(kind)]:

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
