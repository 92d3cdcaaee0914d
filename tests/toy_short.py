"""Short toy settings for the orchestration tests: every stage runs for real, in seconds.

The quality gate is what the toy reproduction and the main job prove (docs/results.md);
these tests prove the wiring, so the quality thresholds are switched off and one always-met
rule keeps the gate real (a gate with no rule fails closed); a test sets it out of reach to
make the gate fail on purpose.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from components.config import load_params

REPO = Path(__file__).resolve().parents[1]
ALWAYS_MET_PSNR = -100.0  # dB: the one gate rule kept on (a gate that checks nothing fails closed)
NEVER_MET_PSNR = 1000.0  # dB: makes the gate fail on purpose

SHORT = [
    "distill.max_steps=6", "distill.batch_size=16", "distill.lora_rank=4", "distill.lora_alpha=4",
    "distill.checkpoint_every=0",
    "evaluate.samples_per_prompt=1", "evaluate.steps=[1,4]", "evaluate.teacher_steps=[8]",
    "evaluate.teacher_samplers=[ddim]", "evaluate.agreement_reference=ddim-8", "evaluate.batch_size=40",
    "evaluate.lcm4_fd_max_ratio_to_teacher50=null", "evaluate.lcm4_fd_below_dpm4=false",
    "evaluate.adherence_min_ratio=null", f"evaluate.lcm1_psnr_min={ALWAYS_MET_PSNR}",
    "merge.weights=[[0.8,1.0]]", "merge.samples_per_prompt=1", "merge.reference_steps=4", "merge.svd_rank=null",
    "merge.save_fused=none", "merge.min_style_retention=0.0", "merge.min_adherence=0.0",
    "orchestrate.torch_threads=1",  # tests share the machine: one thread per process is much faster here
]


def roots(tmp: Path) -> list[str]:
    """Storage, registry and toy-source locations inside `tmp` (nothing written into the repo)."""
    return [f"storage.root={tmp / 'artifacts'}", f"registry.root={tmp / 'registry'}",
            f"registry.cache_dir={tmp / 'registry-cache'}",
            f"toy.source_dir={tmp / 'source'}", f"curate.source={tmp / 'source'}"]


def write_params(tmp: Path, extra: list[str] | None = None, name: str = "params.yaml") -> Path:
    """A resolved params file: the repository's params.yaml with short settings and tmp roots."""
    cfg = load_params(REPO / "params.yaml", SHORT + roots(tmp) + list(extra or []))
    tree = cfg.model_dump(mode="json")
    # Bases keep their repo-relative references: resolve them against the repository.
    for base in tree["bases"].values():
        ref = Path(base["reference"])
        if not ref.is_absolute() and (REPO / ref).exists():
            base["reference"] = str(REPO / ref)
    tree["toy"]["base_dir"] = str(REPO / tree["toy"].get("base_dir", "data/toy/base"))
    path = tmp / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def prefect_harness() -> Iterator[None]:
    """A module's Prefect test server (the flows set one torch thread: put the count back after)."""
    import torch
    from prefect.testing.utilities import prefect_test_harness

    threads = torch.get_num_threads()
    with prefect_test_harness(server_startup_timeout=120):
        yield
    torch.set_num_threads(threads)


def toy_workdir(tmp_path_factory, name: str) -> Path:
    """A fresh folder for a module's nightly runs; fails when the committed toy base is missing."""
    if not (REPO / "data/toy/base/model_index.json").is_file():
        import pytest

        pytest.fail("data/toy/base is missing: the toy base must be committed (lcmlora toy base)")
    return tmp_path_factory.mktemp(name)
