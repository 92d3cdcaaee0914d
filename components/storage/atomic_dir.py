"""Output folders that are complete or absent: write into a hidden sibling, rename it into place.

    with atomic_dir(Path("runs/evaluate/toy"), owns=("*.json", "*.md")) as tmp:
        (tmp / "metrics.json").write_text(...)
    # runs/evaluate/toy now holds exactly what was written into tmp; after an exception
    # (ENOSPC, a crash of the writer) it is what it was before and no sibling is left

The staging folder `.NAME.tmp-PID` sits beside the target, on the same filesystem, so the
final `os.replace` is a rename. An existing target (the previous run's) is moved aside and
removed only after the new folder is in place; `carry` names entries of it that move into the
new folder (distill's `checkpoints/`). `owns` lists the fnmatch patterns of what the writer
puts there: a target holding anything else (someone's `--output .`) is never replaced.

Files get the umask's permissions: safetensors' `save_file` writes through a 0600
`NamedTempFile` and renames it, so its files would stay private to the owner.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path


class FolderNotReplaceable(FileExistsError):
    """The output folder holds entries its writer does not own; it is left untouched."""


def staging_path(target: Path) -> Path:
    """The hidden sibling this process writes `target` into."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def foreign_entries(target: Path, owns: Sequence[str]) -> list[str]:
    """Names in an existing `target` that match none of the `owns` patterns (sorted)."""
    if not target.is_dir():
        return []
    return sorted(e.name for e in target.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in owns))


def check_replaceable(target: Path, owns: Sequence[str]) -> None:
    """Raise FolderNotReplaceable when `target` exists and is not a folder this writer owns."""
    if target.exists() and not target.is_dir():
        raise FolderNotReplaceable(f"{target}: exists and is not a folder; choose another output folder")
    foreign = foreign_entries(target, owns)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FolderNotReplaceable(f"{target}: holds {shown}, which this stage did not write; refusing to "
                                   "replace it. Choose an empty or new output folder, or move them away")


def apply_umask(folder: Path) -> None:
    """Every file below `folder` gets 0666 & ~umask (0777 & ~umask when executable), every folder 0777 & ~umask.

    The umask is read from `folder`'s own mode (it was made by mkdir with 0777), which is
    thread-safe, unlike os.umask's set-and-restore.
    """
    dir_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, dir_mode if executable else dir_mode & 0o666)


def _swap_in(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing target is moved aside first and removed after."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)  # put the previous run back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, owns: Sequence[str], carry: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `target`, else it is removed.

    `owns`: fnmatch patterns of every entry the writer may find in a previous `target`
    (checked before anything is written). `carry`: entries of the previous target moved
    into the new one (kept, not rewritten).
    """
    target = Path(target).absolute()
    check_replaceable(target, owns)
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this pid
    target.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    carried: list[str] = []
    try:
        yield staging
        for name in carry:
            if (target / name).exists() and not (staging / name).exists():
                os.replace(target / name, staging / name)
                carried.append(name)
        apply_umask(staging)
        _swap_in(staging, target)
    except BaseException:
        for name in carried:  # give the previous folder back what was moved out of it
            with contextlib.suppress(OSError):
                os.replace(staging / name, target / name)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds the old text or the whole new one: a hidden temp file beside it, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
