"""Studies: the course's claims reproduced end to end with ift_jax (installed as
`ift_jax.studies`; run by `ift-jax study NAME`, see `ift_jax.studies_runner`).

Each study module defines:

- `NAME`, `TITLE` and `CLAIM` (what the literature says and who says it);
- `plan(preset, root, init_from) -> plans.Plan`: its settings and its steps,
  each an ordinary `ift-jax train` / `ift-jax eval` (or `tasks train-spm`)
  command line with the workdir it fills;
- `results(plan) -> dict`: the numbers, read back from the steps' workdirs;
- `findings(results) -> list[str]`: the claim checked against those numbers
  by a rule stated in the code before any run (reproduced or not);
- `table(results) -> str` and `plot(results, path) -> Optional[str]`.

Presets: `smoke` (a tiny model and a few steps: CI checks the machinery, the
numbers mean nothing), `cpu` (the numbers on docs/studies/, sized for a
2-core CPU) and `gpu` (larger models and more steps; not run here).
"""

from __future__ import annotations

from ift_jax import errors
from ift_jax.studies import (base, dialogsum_flan_t5, forgetting, icl_vs_finetuned, lora_rank,
                             multitask_remedy, prompt_vs_scale)

STUDIES = {module.NAME: module for module in (
    base, forgetting, multitask_remedy, lora_rank, prompt_vs_scale, icl_vs_finetuned,
    dialogsum_flan_t5)}


def get(name: str):
    """The study module called `name`.

    Raises:
      ConfigError: no such study (the message lists the studies).
    """
    if name not in STUDIES:
        raise errors.ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]
