"""Saving and loading what training produces: LoRA adapters (PEFT-style files) and full models.

Directories are written atomically: into a temporary sibling, then renamed, so a crash never
leaves a half-written checkpoint where a resume would look for one.

Adapter files are PEFT's own format (see ossrl.model.adapters).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ossrl.model.adapters import write_adapter


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory that becomes `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(model, path: str | os.PathLike, *, base_model: str | None = None, state=None) -> Path:
    """`state`: the adapter tensors when already gathered (ossrl.model.lora.lora_state_dict)."""
    with atomic_directory(path) as tmp:
        write_adapter(model, tmp, base_model=base_model, state=state)
    return Path(path)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
