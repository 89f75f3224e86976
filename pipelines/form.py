"""The run form: the flows' parameter types as Prefect's UI shows them and its server enforces them.

Prefect builds a deployment's parameter schema from the flow signature (pydantic) and its descriptions from the
docstring's Args section; with `enforce_parameter_schema` (on by default) the server checks a run's parameters
against that schema when the run is created, so a bad preset, stage name or override is refused before any flow
code, let alone Ray, runs. Each type carries the JSON schema of the form (choices, array of strings, an example)
while the Python type stays as permissive as `vitok run`, which calls the same flows: a YAML file as the preset,
None for "all stages", and the flow's own checks (check_stages, preflight) naming the bad value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import WithJsonSchema

from pipelines.stages import STAGES
from vitok_core.config import preset_names

# A config key (letters, digits, _ and dots: evaluate.settings.0.size), "=", a value (OmegaConf syntax).
OVERRIDE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*="  # JSON schema patterns search: the value may be anything
OVERRIDE_EXAMPLE = ["ingest.source=s3://bucket/photos", "train.steps=2000", "evaluate.max_images=500"]

PRESET_HELP = (
    "Config preset from configs/: tiny (a CPU demo; no ingest.source = the demo photos), 350m and 5b (the paper's "
    "autoencoders), dec_B/L/G/T (the decoder-scaling study)."
)
OVERRIDES_HELP = (
    "Config overrides, one key=value per item, e.g. ingest.source=s3://bucket/photos, train.steps=2000 "
    "(`vitok config show` lists every key). Checked before any Ray work."
)
# A description inside the type's schema is used wherever the flow's docstring does not describe the parameter.
Preset = Annotated[str, WithJsonSchema({"type": "string", "enum": preset_names(), "description": PRESET_HELP})]
Stage = Annotated[str, WithJsonSchema({"type": "string", "enum": list(STAGES)})]
_STAGE_LIST = {"type": "array", "items": {"type": "string", "enum": list(STAGES)}, "uniqueItems": True}
Stages = Annotated[Sequence[str] | None, WithJsonSchema(_STAGE_LIST)]
_OVERRIDE_LIST = {
    "type": "array",
    "items": {"type": "string", "pattern": OVERRIDE_PATTERN},
    "examples": [OVERRIDE_EXAMPLE],
    "description": OVERRIDES_HELP,
}
Overrides = Annotated[Sequence[str], WithJsonSchema(_OVERRIDE_LIST)]
