"""The run folder: created, proven writable, never mixed with another run, cleaned only by its holder."""

from __future__ import annotations

from pathlib import Path

from .._fs import probe_writable
from .checkpoint import remove_stale_temporaries
from .config import TrainingError


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create the output folder and prove it writable; refuse to mix a new run into an old one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)  # a random name, O_EXCL | O_NOFOLLOW: a planted link is never written through
    except OSError as err:
        raise TrainingError(
            f"--output {out} is not writable ({err.strerror or err}); choose a folder you can write to"
        ) from err
    if not resume and not overwrite and (out / "last.pt").exists():
        raise TrainingError(
            f"--output {out} already holds a run (last.pt); pass --resume to continue it, --overwrite to "
            "start over there, or choose another --output"
        )
    remove_stale_temporaries(out)  # a killed atomic write's leftovers; the run writes its files again
