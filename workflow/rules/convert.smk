"""Conversion of checkpoints in a trainer's native format: results/converted/{run}/step{step}/, one Hugging Face
directory per checkpoint of a run that names a convert command, or whose torch.distributed checkpoints are read
in place (hf_assets: then the conversion serves only the evaluation of the raw checkpoint). Temporary unless
keep_converted is set: gone once every average, evaluation and fine-tune that reads it is done; the conversions
of each run's last (largest window - 1) checkpoints are kept, for the windows of the checkpoints still to land."""

if CONVERTED_RUNS:

    rule convert:
        input:
            native_checkpoint,
        output:
            converted_output(layout.CONVERTED),
        log:
            "logs/convert/{run}/step{step}.log",
        wildcard_constraints:
            run="|".join(map(re.escape, CONVERTED_RUNS)),
        # below every other job, earlier steps first, and with the threads of an average: a conversion waits while
        # jobs that read (and so free) earlier ones can run, and never takes the cores an average waits for; this
        # bounds the disk that conversions take to about (largest window + concurrent jobs) checkpoints' worth
        # (benchmarks/bench_conversion.py)
        priority: conversion_priority
        conda:
            CPU_ENV
        threads: 2
        params:
            converter=converter_option,
        shell:
            "python -m ckpt_stability convert {params.converter} --run {wildcards.run:q}"
            " --step {wildcards.step} --output {output:q} {input:q} > {log:q} 2>&1"

    if trailing_converted_steps():

        use rule convert as convert_trailing with:
            output:
                directory(layout.CONVERTED),
            wildcard_constraints:
                run="|".join(map(re.escape, COMMAND_CONVERTED_RUNS)),
                step="|".join(map(str, trailing_converted_steps())),

        ruleorder: convert_trailing > convert
