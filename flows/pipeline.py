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
    on_source,
    publish_flow,
    style_distill_flow,
    synthesize_flow,
)
from tasks.encode import fingerprint_base
from tasks.publish import GateFailed, enforce_gate
from tasks.runtime import set_torch_threads


def with_objective(cfg: Params, objective: str) -> Params:
    """`cfg` distilling `objective` (the same object when it already does: its keys are unchanged)."""
    if cfg.distill.objective == objective:
        return cfg
    return cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"objective": objective})})


@flow(name="base-pipeline", flow_run_name="base-{base_name}")
def base_pipeline(cfg: Params, base_name: str, base: BaseConfig, resolved: ResolvedBase | None = None,
                  report_rel: str | None = None) -> dict[str, Any]:
    """curate -> encode -> distill -> evaluate (gate) -> merge (-> style-distill) -> publish for one base.

    `resolved`: the base already fingerprinted (the new-base flow), else it is here.
    `report_rel`: also write the returned summary there (storage root), for a nightly elsewhere.
    """
    logger = get_run_logger()
    stages: list[dict[str, Any]] = []
    # the nightly's thread setting and quiet libraries, also in a deployment run in its own process
    set_torch_threads(cfg.orchestrate.torch_threads)

    # 1. The base resolved: its modules' fingerprints key every later stage.
    resolved = resolved or fingerprint_base(base_name, base)
    fingerprints = resolved.fingerprints

    # 2. Data: curated manifest at this base's resolution, latent shards for its VAE.
    curated = curate_flow(cfg, min_side=base.resolution)
    stages.append(stage_row("curate", curated))
    if base.data == "synthesize":  # a base that comes without data (a DreamBooth fine-tune): its own samples
        synthesized = synthesize_flow(cfg, resolved)
        stages.append(stage_row("synthesize", synthesized))
        cfg = on_source(cfg, synthesized["source_url"])  # encode reads its images from that source too
        curated = curate_flow(cfg, min_side=base.resolution)
        stages.append(stage_row("curate synthesized", curated))
    shards = encode_flow(cfg, resolved, curated)
    stages.append(stage_row("encode", shards))
    if shards["reused"] and not shards["skipped"]:
        logger.info("%s: reused the latent shards of VAE %s", base_name, fingerprints["vae"])

    # 3. Per objective (bases.NAME.objectives: LCM, PCM or both, on the same shards): the LoRA, then
    #    its evaluation; a failed gate stops that objective: nothing of it merged or published.
    objectives = base.objectives or [cfg.distill.objective]
    runs: dict[str, dict[str, Any]] = {}
    failed: list[GateFailed] = []
    for objective in objectives:
        run = with_objective(cfg, objective)
        tag = "" if len(objectives) == 1 else f" {objective}"
        lora = distill_flow(run, resolved, shards)
        stages.append(stage_row(f"distill{tag}", lora))
        evaluation = evaluate_flow(run, resolved, lora)
        stages.append(stage_row(f"evaluate{tag}", evaluation))
        logger.info("%s%s: gate %s%s", base_name, tag, "passed" if evaluation["passed"] else "FAILED",
                    "".join(f"\n  - {v}" for v in evaluation["violations"]))
        try:
            enforce_gate(f"{base_name}{tag}", evaluation)  # the one gate check: raises listing every violation
        except GateFailed as err:
            failed.append(err)
            continue
        # 4. Style variants of a gated LCM-LoRA (the merge samples with LCMScheduler), then publish.
        merged = merge_flow(run, resolved, lora) if objective == "lcm" else None
        if merged is not None:
            stages.append(stage_row("merge", merged))
        # 5. Where the merge lost the style (merge.fallback: distill): an LCM-LoRA distilled for the style model.
        styled = None
        if merged is not None and merged.get("style_lost") and run.merge.fallback == "distill":
            styled = style_distill_flow(run, resolved, curated, merged)
            stages.append(stage_row("style-distill", styled))
        published = publish_flow(run, base_name, lora, evaluation, merged, styled)
        stages.append(stage_row(f"publish{tag}", published))
        runs[objective] = {"lora": lora["output"], "evaluation": evaluation["evaluation"],
                           "gate": {"passed": evaluation["passed"]}, "published": published}
    if failed:  # every objective ran; the run fails on the first gate that did not pass
        raise failed[0]
    first = runs[objectives[0]]
    result = {"stages": stages, "fingerprints": fingerprints, **first,
              **({"objectives": runs} if len(objectives) > 1 else {})}
    if report_rel:
        Storage.from_config(cfg.storage).write_text(report_rel, json.dumps(result, indent=1, default=str))
    return result
