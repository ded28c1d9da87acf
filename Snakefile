# Checkpoint stability workflow: see README.md. This file only wires the stages together.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# Jobs run the package that ships with this workflow (``python -m ckpt_stability`` is the
# ``ckpt-stability`` command), whether or not it is installed: its source goes on the path of this
# process and, through the environment, of every job (local, cluster, or in a conda env).
SOURCE = os.path.join(workflow.basedir, "src")
sys.path.insert(0, SOURCE)
os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")])))


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/average.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ensemble.smk"
include: "workflow/rules/stability.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/indicators.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        final_targets(),
