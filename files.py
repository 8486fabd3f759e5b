"""Safe file writing and loading shared by every step of the pipeline."""
import os
import tempfile

import torch

from config import UserError


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) (torch.save, or torch.jit.save) to a temporary file beside `path`, then
    rename: a crash leaves the old file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pth")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as file:
            save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        os.unlink(temporary)
        reason = getattr(error, "strerror", None) or "the write failed (disk full?)"
        raise UserError(f"cannot write {path}: {reason}; the previous file is kept") from None
    except BaseException:
        os.unlink(temporary)
        raise


def load_pth(path, what, required_keys=(), mmap=False):
    """torch.load with weights_only=True (never runs code from the file) and clear errors. With
    mmap (files in torch.save's zip format) tensors are memory-mapped: what the caller never reads
    (a checkpoint's optimizer state, for generate) is never loaded."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, pickle with code, not a torch file...
        reason = str(error).strip().splitlines()[0][:200]
        raise UserError(f"{path}: not a readable {what} ({type(error).__name__}: {reason})") from None
    missing = [key for key in required_keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{path}: not a {what}: missing {', '.join(missing)}")
    return data


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
