"""What every ``monim`` command that talks to a running server shares: its connection options and
the MemoryClient they make, and a console for tables."""

from __future__ import annotations

import argparse
import sys

DEFAULT_ADDRESS = "127.0.0.1:50051"
# Width of tables written to a file or a pipe, where no terminal says how wide to be (no wrapping).
PIPE_WIDTH = 240


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", default=None,
                        help="the token of a server started with --auth-file (default: $MONIM_TOKEN, which, unlike "
                             "this flag, other users cannot see in the process list)")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server's certificate (TLS)")
    parser.add_argument("--tls-cert", default=None, help="PEM file of this client's certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, help="PEM file of this client's key (mutual TLS)")


def add_connection_options(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    """--address, --timeout-s (each RPC's deadline), and the token and TLS options."""
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"the server (default {DEFAULT_ADDRESS})")
    parser.add_argument("--timeout-s", type=float, default=timeout_s, help=f"each call's deadline (default {timeout_s:g})")
    add_client_options(parser)


def connect(args, **options):
    """A MemoryClient for --address with the command's --token and --tls-* options."""
    from monim.model_client import MemoryClient

    return MemoryClient(args.address, token=args.token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, **options)


def console(file=None):
    """A rich Console on stdout (or file): the terminal's width on a terminal, else PIPE_WIDTH."""
    from rich.console import Console

    file = file or sys.stdout
    return Console(file=file, width=None if file.isatty() else PIPE_WIDTH, highlight=False)
