"""The files a server is given (an auth file, a config file, TLS certificates and keys): one way to
read them, one error for every way they fail."""

from __future__ import annotations

import sys

from monim.protos.errors import InvalidArgument


def read_bytes(path: str, what: str) -> bytes:
    """The file's bytes. InvalidArgument "<what> <path>: ..." if it is missing, a directory, or unreadable."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{what} {path}: is a directory") from None
    except OSError as error:
        raise InvalidArgument(f"{what} {path}: cannot be read ({error.strerror or error})") from None


def read_toml(path: str, what: str) -> dict:
    """The file's top table; InvalidArgument as read_bytes, or if it is not TOML (or not UTF-8)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the server extra installs tomli on 3.10 (imported here: `monim status` needs only the base install)
        import tomli as tomllib
    data = read_bytes(path, what)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"{what} {path}: not valid TOML: {error}") from None
