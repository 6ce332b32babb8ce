"""Errors that carry a message meant for the user (the CLI prints them and exits with code 2)."""


class DyodError(Exception):
    """A problem with the user's input (file, flag, model, run folder), explained in the message."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" for none): a library's long message, cut to what names the fault."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def write_atomically(path, write, what: str = "file") -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``, so a crash leaves the earlier file whole. A write that fails (a
    full disk above all) leaves no partial ``.tmp`` behind and is a DyodError that names the file and what to do."""
    import errno
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - OSError, safetensors' and PIL's own errors: each is the same failure here
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        reason = "the disk is full" if full else (first_line(e) or type(e).__name__)
        raise DyodError(f"could not write the {what} {path}: {reason}; "
                        + ("free some space (or give another folder) and run the command again (--resume continues a "
                           "training): what was finished before is kept" if full else
                           "what was finished before is kept")) from e
