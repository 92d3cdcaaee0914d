"""Before hours of training: can the output folder be written, and is there room for the artifact?

    need = distill_artifact_bytes(lora_params=n, checkpoints=2)
    check_output_folder(Path("runs/distill/toy"), need)   # raises OutputNotWritable / NotEnoughSpace

The check probes where the stage will write: the folder itself when it exists (checkpoints go
there during training) and the nearest existing folder above it (the artifact is staged in a
sibling and renamed into place, `components/storage/atomic_dir.py`). A probe file is created and
removed, so a read-only mount, `chattr +i` or a path below a regular file fail here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FP32_BYTES = 4
LORA_FILES = 2  # the diffusers/peft and the kohya file hold the same tensors
CHECKPOINT_COPIES = 3  # an accelerate checkpoint: the LoRA weights and AdamW's two moments
ARTIFACT_SLACK = 4 * 2**20  # model card, lineage, metrics, config, loss curve (csv + png)


class OutputNotWritable(PermissionError):
    """The output folder (or the folder it is created in) cannot be written."""


class NotEnoughSpace(OSError):
    """The filesystem of the output folder has less free space than the artifact needs."""


def distill_artifact_bytes(*, lora_params: int, checkpoints: int, dtype_bytes: int = FP32_BYTES) -> int:
    """Expected bytes of a distill run's folder: both LoRA files, `checkpoints` kept checkpoints
    (one more exists while the next is written), and the small files."""
    lora = lora_params * dtype_bytes
    in_flight = checkpoints + 1 if checkpoints else 0
    return LORA_FILES * lora + in_flight * CHECKPOINT_COPIES * lora + ARTIFACT_SLACK


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(folder: Path, output: Path) -> None:
    """Create and remove a hidden file in `folder`; raise OutputNotWritable naming `output` and why."""
    probe = folder / f".lcmlora-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritable(f"{output}: cannot write into {folder} ({exc.strerror or exc}); "
                                "choose a writable --output (or distill.output) before training") from None


def check_output_folder(output: Path, need_bytes: int) -> None:
    """Fail before any work when `output` cannot be written or its filesystem lacks `need_bytes` free."""
    output = Path(output).absolute()
    above = nearest_existing(output.parent)
    if not above.is_dir():
        raise OutputNotWritable(f"{output}: {above} is a file, not a folder; choose another --output")
    probe_writable(above, output)
    if output.is_dir():
        probe_writable(output, output)
    elif output.exists():
        raise OutputNotWritable(f"{output}: exists and is not a folder; choose another --output")
    free = shutil.disk_usage(above).free
    if free < need_bytes:
        raise NotEnoughSpace(f"{output}: the artifact needs about {need_bytes / 2**20:.1f} MiB but {above} has "
                             f"{free / 2**20:.1f} MiB free ({need_bytes} bytes needed, {free} free); free space "
                             "or choose another --output")
