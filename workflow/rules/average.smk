"""Checkpoint averaging: results/averaged/{run}/{method}{n}/step{step}/, one model per averaging method (avg and those
of config key averaging) and window, and what the average measured of its members' weights on the way,
results/weights/{run}/{method}{n}/step{step}.json.

Averaged weights are as large as a checkpoint: they are temporary unless keep_averaged is set, and
grouped with the evaluation that reads them, so that on a cluster both run in one job on one node."""


rule average:
    input:
        window_checkpoints,
    output:
        model=averaged_output(layout.AVERAGED),
        distances=layout.WEIGHT_DISTANCES,
    log:
        "logs/average/{run}/{method}{n}/step{step}.log",
    wildcard_constraints:
        method=averaging_methods(),
    group:
        "average_and_evaluate"
    conda:
        CPU_ENV
    threads: 2
    params:
        # the window's member steps: a change of membership rebuilds the average
        members=window_steps,
        scheme=averaging_options,
        dtype=f"--dtype {shlex.quote(config['averaged_dtype'])}" if config["averaged_dtype"] else "",
        assets=assets_option,
    shell:
        "python -m ckpt_stability average --output {output.model:q} --diagnostics {output.distances:q}"
        " {params.scheme} --steps {params.members:q} --threads {threads} --record-unusable {params.dtype}"
        " {params.assets} {input:q} > {log:q} 2>&1"
