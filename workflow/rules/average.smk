"""Checkpoint averaging: results/averaged/{run}/avg{n}/step{step}/, one model per window.

Averaged weights are as large as a checkpoint: they are temporary unless keep_averaged is set, and
grouped with the evaluation that reads them, so that on a cluster both run in one job on one node."""


rule average:
    input:
        window_checkpoints,
    output:
        averaged_output(layout.fill(layout.AVERAGED, method=AVG.name)),
    log:
        "logs/average/{run}/avg{n}/step{step}.log",
    group:
        "average_and_evaluate"
    conda:
        CPU_ENV
    threads: 2
    params:
        # the window's member steps: a change of membership rebuilds the average
        members=window_steps,
        dtype=f"--dtype {shlex.quote(config['averaged_dtype'])}" if config["averaged_dtype"] else "",
        assets=assets_option,
    shell:
        "python -m ckpt_stability average --output {output:q} --steps {params.members:q} --threads {threads}"
        " --record-unusable {params.dtype} {params.assets} {input:q} > {log:q} 2>&1"
