"""Safe file writing and loading shared by every step of the pipeline."""
import contextlib
import glob
import io
import json
import os
import tempfile

import torch

from config import UserError

TEMPORARY = ".tmp-"  # the name prefix of atomic_save's temporary files


def atomic_save(obj, path, save=torch.save):
    """save(obj, file) (torch.save, or torch.jit.save) to a temporary file beside `path`, then
    rename: a crash leaves the old file."""
    content = io.BytesIO()
    save(obj, content)  # in memory first: torch.save into the file would hide the OS's reason for a failed write
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f"{TEMPORARY}{os.path.basename(path)}-")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content.getbuffer())
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(temporary, path)
    except OSError as error:
        os.unlink(temporary)
        kept = "; the previous file is kept" if os.path.isfile(path) else ""
        raise UserError(f"cannot write {path}: {error.strerror or error}{kept}") from None
    except BaseException:
        os.unlink(temporary)
        raise


def remove_leftovers(folder, name=""):
    """Delete the temporary files of saves (of the file `name`, or all) that a killed process never
    finished (atomic_save's)."""
    for leftover in glob.glob(os.path.join(glob.escape(folder), glob.escape(TEMPORARY + name) + "*")):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


def check_input_file(path, what):
    """A user's input file must be a regular file (a folder, a FIFO or a device would fail or hang)."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such {what}")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a regular file (a {what} is expected)")


def read_json(path, what):
    """The JSON of a user's file: UTF-8, with or without the BOM Windows editors write; anything
    else (not text, not JSON, nested too deep, numbers too long) is one clear error."""
    check_input_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except OSError as error:
        raise UserError(f"{path}: cannot read the {what}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a {what} is JSON in UTF-8)") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, a 5000-digit number, [[[[...
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(f"{path}: not valid JSON, which a {what} is: {reason}") from None


def write_json(obj, path):
    """JSON (UTF-8, readable Chinese) written as atomic_save writes: a failure leaves the old file."""
    atomic_save(obj, path, save=lambda value, file: file.write(json.dumps(value, ensure_ascii=False,
                                                                          indent=1).encode("utf-8")))


def check_output_file(path, inputs=()):
    """Refuse, before any work, an output path that cannot be written as a file, or that is one of
    the command's input files."""
    if os.path.exists(path) and any(source and os.path.exists(source) and os.path.samefile(path, source)
                                    for source in inputs):
        raise UserError(f"{path}: is also an input of this command; choose another output")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{path}: its folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"{path}: not writable")


def check_output_folder(path, what):
    """A folder the command will write into: existing or creatable, never a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: is a file, but the {what} must be a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot make the {what} {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: the {what} is not writable")


def load_pth(path, what, required_keys=(), mmap=False):
    """torch.load with weights_only=True (never runs code from the file) and clear errors. With
    mmap (files in torch.save's zip format) tensors are memory-mapped: what the caller never reads
    (a checkpoint's optimizer state, for generate) is never loaded."""
    check_input_file(path, what)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, pickle with code, not a torch file, empty...
        reason = (str(error).strip().splitlines() or ["no details"])[0][:200]
        kind = _not_torch(path)
        if kind:
            raise UserError(f"{path}: not a readable {what}: {kind}, not a file this toolkit wrote") from None
        raise UserError(f"{path}: not a readable {what} ({type(error).__name__}: {reason})") from None
    if required_keys and not isinstance(data, dict):
        raise UserError(f"{path}: not a {what}: it holds a {type(data).__name__}, not a dict")
    missing = [key for key in required_keys if key not in data]
    if missing:
        raise UserError(f"{path}: not a {what}: missing {', '.join(missing)}")
    return data


SIGNATURES = ((b"\xff\xd8", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"{", "JSON"), (b"[", "JSON"))


def _not_torch(path):
    """What a file torch.load cannot read is, when its first bytes show it is not torch.save's (a zip
    archive, or an older version's pickle); None when it may be one (a truncated one, say)."""
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith((b"PK", b"\x80")):
        return None
    kinds = [kind for signature, kind in SIGNATURES if head.lstrip().startswith(signature)]
    return kinds[0] if kinds else "an empty file" if not head else "not a PyTorch file"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
