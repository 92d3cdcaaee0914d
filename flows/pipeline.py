"""One base through the stages, in order: the body shared by the nightly and new-base flows.

Also the `base-pipeline` deployment's entrypoint (infra/prefect.yaml): the fanned-out nightly
submits one run per base with the resolved params (`cfg`), and reads the base's summary back
from `report_rel` under the storage root.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from components.config import BaseConfig, Params
from components.models.base_model import ResolvedBase
from components.run_summary import stage_row
from components.storage.storage import Storage
from flows.stages import (
    curate_flow,
    distill_flow,
    encode_flow,
    evaluate_flow,
    merge_flow,
    publish_flow,
)
from tasks.encode import fingerprint_base
from tasks.publish import enforce_gate
from tasks.runtime import set_torch_threads


@flow(name="base-pipeline", flow_run_name="base-{base_name}")
def base_pipeline(cfg: Params, base_name: str, base: BaseConfig, resolved: ResolvedBase | None = None,
                  report_rel: str | None = None) -> dict[str, Any]:
    """curate -> encode -> distill -> evaluate (gate) -> merge -> publish for one base.

    `resolved`: the base already fingerprinted (the new-base flow), else it is here.
    `report_rel`: also write the returned summary there (storage root), for a nightly elsewhere.
    """
    logger = get_run_logger()
    stages: list[dict[str, Any]] = []
    if report_rel:  # a deployment run in its own process: the nightly's thread setting
        set_torch_threads(cfg.orchestrate.torch_threads)

    # 1. The base resolved: its modules' fingerprints key every later stage.
    resolved = resolved or fingerprint_base(base_name, base)
    fingerprints = resolved.fingerprints

    # 2. Data: curated manifest at this base's resolution, latent shards for its VAE.
    curated = curate_flow(cfg, min_side=base.resolution)
    stages.append(stage_row("curate", curated))
    shards = encode_flow(cfg, resolved, curated)
    stages.append(stage_row("encode", shards))
    if shards["reused"] and not shards["skipped"]:
        logger.info("%s: reused the latent shards of VAE %s", base_name, fingerprints["vae"])

    # 3. The LCM-LoRA, then its evaluation; a failed gate stops here: nothing merged or published.
    lora = distill_flow(cfg, resolved, shards)
    stages.append(stage_row("distill", lora))
    evaluation = evaluate_flow(cfg, resolved, lora)
    stages.append(stage_row("evaluate", evaluation))
    logger.info("%s: gate %s%s", base_name, "passed" if evaluation["passed"] else "FAILED",
                "".join(f"\n  - {v}" for v in evaluation["violations"]))
    enforce_gate(base_name, evaluation)  # the one gate check: raises GateFailed listing every violation

    # 4. Style variants of the gated LoRA, then publish.
    merged = merge_flow(cfg, resolved, lora)
    stages.append(stage_row("merge", merged))
    published = publish_flow(cfg, base_name, lora, evaluation, merged)
    stages.append(stage_row("publish", published))
    result = {"stages": stages, "fingerprints": fingerprints, "lora": lora["output"],
              "evaluation": evaluation["evaluation"], "gate": {"passed": evaluation["passed"]}, "published": published}
    if report_rel:
        Storage.from_config(cfg.storage).write_text(report_rel, json.dumps(result, indent=1, default=str))
    return result
