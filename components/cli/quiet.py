"""The libraries' known harmless output, dropped at every edge of lcmlora: the CLI's entry point
(each stage command runs under it, `accelerate launch` ranks included) and the set-up of every
flow run (tasks/runtime.py), so a flow on a Prefect worker is as quiet as one under the CLI. The
library (components/) never silences anything itself.

What goes: the libraries' own loading and download bars (diffusers' `Loading pipeline
components...`, transformers' `Loading weights`, huggingface_hub's downloads), switched off by
their own switches; and the exact messages below. Every other warning, from any logger, shows.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

# Messages known to be harmless for lcmlora's use: (logger name, text the message contains).
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    # every LCM-LoRA load: it holds no text-encoder layers, by design (UNet-only LoRA); the same
    # message about the UNet (nothing loaded at all) stays
    ("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.peft", "No LoRA keys associated to CLIPTextModel"),
    ("diffusers.loaders.lora_pipeline", "No LoRA keys associated to CLIPTextModel"),
    # the CPU torch build has no torchvision; the PIL image processors are used instead
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    # `vae.to(dtype)` of a model with no module to keep in float32 (the list is empty)
    ("diffusers.models.modeling_utils", "that should be kept in float32: []."),
)
KNOWN_WARNINGS: tuple[str, ...] = (  # peft's warnings.warn messages (regex from the start), same rule
    r"Adapter \S+ was active which is now deleted",  # merge evaluation deletes its temporary adapters
    # merge evaluation loads the style LoRA beside the LCM-LoRA on purpose
    r"Already found a `peft_config` attribute in the model\. This will lead to having multiple adapters",
)
WARNING_MODULES = r"peft\."  # the modules KNOWN_WARNINGS are raised from

# module -> the function of it that turns its progress bars off
PROGRESS_BAR_SWITCHES: dict[str, str] = {
    "diffusers.utils.logging": "disable_progress_bar",  # "Loading pipeline components..."
    "transformers.utils.logging": "disable_progress_bar",  # "Loading weights", and the hub's bars
    "huggingface_hub.utils": "disable_progress_bars",  # downloads
}


class DropContaining(logging.Filter):
    """Drops the records of one logger whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after `name` is first imported (see `when_imported`)."""

    def __init__(self, name: str, then: Callable[[ModuleType], object]):
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; and the look-up below must not find this finder again
        spec = next((s for f in sys.meta_path if hasattr(f, "find_spec")
                     and (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def load_then(module: ModuleType) -> None:
                load(module)
                self.then(module)

            spec.loader.exec_module = load_then  # type: ignore[method-assign]  # this module's loader only
        return spec


def when_imported(name: str, then: Callable[[ModuleType], object]) -> None:
    """`then(module)` now if module `name` is imported, else once it is (by whichever code imports it).

    Importing diffusers takes seconds: the CLI's entry point must not, or `--help` gets slow.
    """
    if name in sys.modules:
        then(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


def _switch_off(function: str) -> Callable[[ModuleType], object]:
    return lambda module: getattr(module, function)()


def quiet_known_noise() -> None:
    """Drop the libraries' bars and the known harmless messages above (idempotent, process-wide)."""
    # 1. Progress bars, by the libraries' own switches.
    for module, function in PROGRESS_BAR_SWITCHES.items():
        when_imported(module, _switch_off(function))
    # 2. Known log messages: a filter on the logger that emits them (its other messages pass).
    for name, text in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(DropContaining(text))
    # 3. Known warnings.warn messages, raised from peft only (filterwarnings replaces an equal filter).
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning, module=WARNING_MODULES)
