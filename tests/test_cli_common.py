"""The CLI's shared options: `--base` defaults to the only base in params, never to the toy by name;
and the quieting every edge applies (components/cli/quiet.py): the libraries' bars and the known
harmless messages go, any other warning stays."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest

from components.cli.quiet import DropContaining, quiet_known_noise
from components.config import load_params
from flows.cli_common import pick_base

REPO = Path(__file__).resolve().parents[1]
TWO_BASES = ['bases.ft={"reference": "data/toy/base", "family": "sd15"}']


def test_the_only_base_is_the_default() -> None:
    cfg = load_params("params.yaml", ['bases={"mine": {"reference": "data/toy/base", "family": "sd15"}}'])
    assert pick_base(cfg, None) == "mine"


def test_several_bases_need_base_naming_them() -> None:
    cfg = load_params("params.yaml", TWO_BASES)
    with pytest.raises(click.UsageError, match=r"--base is required: params defines 2 bases \(ft, toy\)"):
        pick_base(cfg, None)
    assert pick_base(cfg, "ft") == "ft"


def test_known_library_noise_is_dropped_and_other_messages_of_the_same_logger_stay(
        caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.propagate, logger.disabled = True, False
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger and text
    ours = [f for f in logger.filters if isinstance(f, DropContaining)]
    assert len(ours) == 1, logger.filters
    with caplog.at_level(logging.WARNING, logger="diffusers.loaders.lora_base"):
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logger.warning("No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder_2'.")
        logger.warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.")  # nothing loaded
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == [
        "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.", "something else went wrong"]


def _warn(message: str, module: str) -> None:
    warnings.warn_explicit(message, UserWarning, f"{module.replace('.', '/')}.py", 1, module=module)


def test_only_peft_s_known_warnings_are_dropped() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        quiet_known_noise()
        _warn("Already found a `peft_config` attribute in the model. This will lead to having multiple adapters "
              "in the model. Make sure to know what you are doing!", "peft.tuners.tuners_utils")
        _warn("Adapter style was active which is now deleted. Setting active adapter to lcm.", "peft.tuners.tuners_utils")
        _warn("peft: something else", "peft.tuners.tuners_utils")
        _warn("Already found a `peft_config` attribute in the model. This will lead to having multiple adapters",
              "somewhere.else")  # the same words from another library: not known to be harmless
        ours = [f for f in warnings.filters if f[1] is not None and f[1].pattern.startswith("Already found")]
    assert [str(w.message) for w in caught] == [
        "peft: something else",
        "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters"]
    assert len(ours) == 1, ours


def test_a_flow_run_s_set_up_quiets_its_process_as_the_cli_does() -> None:
    """A flow on a Prefect worker never passes the CLI's entry point: tasks/runtime.py's set-up quiets it."""
    from tasks.runtime import set_torch_threads

    logger = logging.getLogger("transformers.utils.import_utils")
    for f in [f for f in logger.filters if isinstance(f, DropContaining)]:
        logger.removeFilter(f)
    with warnings.catch_warnings():
        set_torch_threads.fn(None)
        known = [f for f in warnings.filters if f[1] is not None and f[1].pattern.startswith("Already found")]
    assert any(isinstance(f, DropContaining) for f in logger.filters) and known


PROBE = """
import logging, sys, warnings
if sys.argv[1] == "quiet":
    from components.cli.quiet import quiet_known_noise
    quiet_known_noise()  # as the CLI's entry point does: before diffusers is imported
    assert "diffusers" not in sys.modules
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from transformers import CLIPImageProcessor  # the torchvision notice, on a CPU torch build

pipe = StableDiffusionPipeline.from_pretrained(sys.argv[2])
for name in ("lcm", "style"):  # merge evaluation: a second adapter beside the first, then deleted
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]), adapter_name=name)
pipe.unet.delete_adapters("style")
logging.getLogger("diffusers.loaders.lora_base").warning("a real problem, logged")
warnings.warn_explicit("a real problem, warned", UserWarning, "peft/x.py", 1, module="peft.tuners.tuners_utils")
print("loaded", file=sys.stderr)
"""
NOISE = ("Loading pipeline components", "Loading weights", "requires torchvision",
         "Already found a `peft_config`", "was active which is now deleted", "warnings.warn(")


def test_a_real_pipeline_load_is_quiet_but_real_problems_show(tmp_path: Path) -> None:
    """The toy base loaded by diffusers, without and with the quieting, in fresh processes (as a stage runs)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    runs = {mode: subprocess.Popen([sys.executable, "-c", PROBE, mode, str(REPO / "data/toy/base")], cwd=tmp_path,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for mode in ("loud", "quiet")}
    err = {mode: proc.communicate(timeout=300)[1] for mode, proc in runs.items()}
    assert all(runs[m].returncode == 0 and "loaded" in err[m] for m in runs), err
    assert all(text in err["loud"] for text in NOISE), err["loud"]  # what the libraries print unquieted
    assert [text for text in NOISE if text in err["quiet"]] == [], err["quiet"]
    assert "a real problem, logged" in err["quiet"] and "a real problem, warned" in err["quiet"]
