"""Files a run writes, each atomically (a temporary file beside it, then a rename): never a half-written one.

Failures become one-line messages (try_write), so that every process can learn of rank 0's and stop together.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image  # Pillow comes with matplotlib


def atomic_write(path, write):
    """write(tmp) to a temporary file beside path, then rename it: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isfile(tmp):
            os.remove(tmp)


RESUME_HINT = "the checkpoints on disk are kept, and the same command resumes the run"


def try_write(path, write, hint=RESUME_HINT):
    """write() -> None, or the one-line message of its failure: the file, the error, what is kept, what to do.

    Any error counts: a full disk, a quota, a file system gone away, a folder where the file goes."""
    try:
        write()
    except Exception as e:
        return (f"could not write {path} ({type(e).__name__}: {e}); {hint} once the cause is fixed "
                "(disk space, quota, permissions)")
    return None


def write_json(path, obj):
    """obj as JSON at path, atomically (a manifest, a report)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def write_npz(path, arrays):
    """np.savez(path, **arrays), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:       # a file object: np.savez would append ".npz" to a temporary name
            np.savez(f, **arrays)
    atomic_write(path, write)


def to_uint8(x):
    """[-1, 1] -> uint8 pixels as the ADM evaluator expects: clamp(x * 127.5 + 128, 0, 255)."""
    return (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def save_grid(path, pixels, columns):
    """(N, H, W, C) uint8 -> a PNG with `columns` images per row (channel 0 in grey if C != 3), atomically."""
    N, H, W, C = pixels.shape
    pixels = np.concatenate([pixels, np.zeros((-N % columns, H, W, C), np.uint8)])
    grid = rearrange(pixels, "(r c) h w ch -> (r h) (c w) ch", c=columns)
    grid = grid if C == 3 else np.repeat(grid[..., :1], 3, axis=-1)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
