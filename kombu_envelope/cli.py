"""The ``kombu-envelope`` command (also ``python -m kombu_envelope``)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import EnvelopeError

Command = Callable[[argparse.Namespace], int]


def _keygen(args: argparse.Namespace) -> int:
    from .providers.local import write_key_file

    try:
        write_key_file(args.path)
    except FileExistsError:
        print(f"kombu-envelope keygen: {args.path} exists; refusing to overwrite a key (messages under it would be lost)", file=sys.stderr)
        return 1
    print(f"wrote a new key to {args.path} (mode 600). Use it with: KOMBU_ENVELOPE_KEY_URI=local://{args.path}")
    print("local:// keys are for development: in production use a key service (aws-kms://, vault://, ...).")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kombu-envelope",
        description="Envelope encryption for Celery/Kombu messages: keys, demo and operator tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("keygen", help="create a local:// key file (development only)", description=_keygen.__doc__)
    p.add_argument("path", help="where to write the key; must not exist")
    p.set_defaults(run=_keygen)

    p = sub.add_parser("demo", help="run the end-to-end demo in memory, no servers needed")
    p.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except EnvelopeError as exc:
        print(f"kombu-envelope {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
