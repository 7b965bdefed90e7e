# Validation, wildcard constraints and the run-wide hooks. No rules here; the helpers the rules call (config
# slices, paths, resources, the config checks that need Python) are plain Python in rules/dag.py.

import re

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

import dag
from dag import METHODS, MODELS, RATIOS

dag.setup(config, workflow)  # checks the config (a ValueError naming the fix) and lists models, methods, ratios


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)),
    method="|".join(map(re.escape, METHODS)),
    ratio=r"[01]\.\d\d",
    source="pretrained|prehab|prehab-control",
    split="calibration|evaluation",
    stage=r"\d+",


onerror:
    dag.slurm_logs_into_rule_logs()
