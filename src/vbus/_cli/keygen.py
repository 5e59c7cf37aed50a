"""``vbus keygen NAME``: a CURVE keypair in NAME.key (secret, mode 0600) and NAME.key.pub."""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._security import write_keypair
from .common import UserError, add_parser, say


def register(commands: Any) -> None:
    p = add_parser(
        commands, "keygen",
        help="make a CURVE keypair for a secure broker or client",
        description=(
            "Write NAME.key (public and secret key, readable by you only) and NAME.key.pub "
            "(the public key, to give to the other side). A broker takes its NAME.key with "
            "--keys and a directory of clients' .pub files with --authorized; a client takes "
            "its NAME.key with --keys and the broker's .pub with --server-key."
        ),
        example=(
            "example:\n"
            "  vbus keygen server && vbus keygen alice\n"
            "  mkdir clients && mv alice.key.pub clients/\n"
            "  vbus broker --bind tcp://0.0.0.0:5555 --keys server.key --authorized clients\n"
            "  vbus sub tcp://HOST:5555 'stage/*' --keys alice.key --server-key server.key.pub"
        ),
    )
    p.add_argument("name", metavar="NAME", help="path and base name of the two files")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    secret, public = f"{args.name}.key", f"{args.name}.key.pub"
    existing = [f for f in (secret, public) if os.path.exists(f)]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists; pass --force to replace it")
    pair = write_keypair(args.name)
    print(pair.public)
    say(f"vbus keygen: wrote {secret} (secret, mode 0600) and {public} (public)")
    return 0
