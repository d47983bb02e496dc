"""The ``kombu-envelope`` command (also ``python -m kombu_envelope``).

Exit codes: 0 success; 1 the command worked and found a problem (a weak
configuration, plaintext in a queue, a message that is not an envelope);
2 it could not do its job (bad setting, broker or key service unreachable).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, Callable, Sequence

from .errors import ConfigurationError, EnvelopeError
from .queues import QueuedMessage, parse_kombu_record

Command = Callable[[argparse.Namespace], int]

ENVELOPE_CONTENT_TYPE = "application/x-kombu-envelope"  # = serializer.CONTENT_TYPE


# -- keygen, demo -----------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    from .providers.local import write_key_file

    try:
        write_key_file(args.path)
    except FileExistsError:
        print(
            f"kombu-envelope keygen: {args.path} exists; refusing to overwrite a key (messages under it would be lost)",
            file=sys.stderr,
        )
        return 1
    print(f"wrote a new key to {args.path} (mode 600). Use it with: KOMBU_ENVELOPE_KEY_URI=local://{args.path}")
    print("local:// keys are for development: in production use a key service (aws-kms://, vault://, ...).")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(sys.stdout)


# -- shared: the app, its settings, a message to look at ---------------------------


def _load_app(name: str) -> Any:
    from celery.app.utils import find_app

    try:
        return find_app(name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load the Celery app {name!r} given with -A: {exc}") from None


def _settings(args: argparse.Namespace) -> Any:
    """Settings of the -A app, else of the environment (KOMBU_ENVELOPE_*)."""
    from .settings import load_settings

    return load_settings(_load_app(args.app).conf if args.app else None)


def _broker_url(args: argparse.Namespace) -> str:
    if args.broker:
        return str(args.broker)
    if args.app:
        url = _load_app(args.app).conf.broker_url
        if url:
            return str(url)
    raise ConfigurationError(
        "name the broker: --broker redis://localhost:6379/0 (or -A proj to use the app's broker_url)"
    )


def _read_message(args: argparse.Namespace) -> tuple[QueuedMessage, str]:
    """The message named by the arguments, and where it came from."""
    from .queues import open_reader

    if args.queue:
        url = _broker_url(args)
        with open_reader(url) as reader:
            messages = list(reader.read(args.queue, limit=args.index + 1))
        if len(messages) <= args.index:
            raise ConfigurationError(f"queue {args.queue!r} holds fewer than {args.index + 1} messages")
        where = "next to be delivered" if args.index == 0 else f"{args.index} delivered before it"
        return messages[args.index], f"queue {args.queue!r}, position {args.index} ({where})"
    if args.source is None:
        raise ConfigurationError(
            "name a message: a FILE, - for standard input, or --queue NAME (with --broker URL or -A proj)"
        )
    if args.source == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {args.source}: {exc.strerror}") from None
    return _message_from_bytes(data), "standard input" if args.source == "-" else args.source


def _message_from_bytes(data: bytes) -> QueuedMessage:
    """A raw envelope body, its base64, or a Kombu message record (as Redis stores it: JSON)."""
    import base64
    import binascii

    if data.lstrip().startswith(b"{"):
        message = parse_kombu_record(data)
        if message.problem:
            raise ConfigurationError(f"the input is JSON but {message.problem}")
        return message
    if data[:1] != b"\x01":  # not a raw version-1 envelope: base64 of one?
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            pass  # parse_header will say what is wrong with the raw bytes
    return QueuedMessage(0, ENVELOPE_CONTENT_TYPE, "binary", data)


def _headers_of_note(message: QueuedMessage) -> dict[str, Any]:
    """The Celery headers that stay in plaintext and say what a task is (and whether arguments leak)."""
    return {k: message.headers[k] for k in ("task", "id", "argsrepr", "kwargsrepr") if k in message.headers}


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


# -- inspect, decrypt ----------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from .describe import describe
    from .errors import InvalidEnvelope

    message, where = _read_message(args)
    note: str | None = None
    try:
        settings = _settings(args)
    except ConfigurationError as exc:  # inspecting needs no settings: only names keys with them
        settings, note = None, f"settings not loaded ({exc}); key URIs not shown"
    result: dict[str, Any] = {
        "message": where,
        "content_type": message.content_type,
        "headers": _headers_of_note(message),
    }
    if message.content_type != ENVELOPE_CONTENT_TYPE:
        result["error"] = f"not an envelope message: content type {message.content_type!r} (plaintext)"
    else:
        try:
            result.update(describe(message.body, settings).as_dict())
        except InvalidEnvelope as exc:
            result["error"] = f"not a valid envelope: {exc.reason}"
    if args.json:
        _print_json(result)
    else:
        _print_inspection(result, note)
    return 1 if "error" in result else 0


def _print_inspection(result: dict[str, Any], note: str | None) -> None:
    rows = [("message", result["message"]), ("content type", result["content_type"])]
    rows += [(f"header {k}", str(v)) for k, v in result["headers"].items()]
    if "error" in result:
        rows.append(("error", result["error"]))
    else:
        context = result["encryption_context"]
        rows += [
            ("format version", str(result["format_version"])),
            ("algorithm", result["algorithm"]),
            ("compression", result["compression"] or "none"),
            ("encryption context", json.dumps(context, sort_keys=True) if context else "none"),
            ("wrapped keys", str(len(result["wrapped_keys"]))),
        ]
        for i, key in enumerate(result["wrapped_keys"], 1):
            named = f"{key['key_uri']} ({key['setting']})" if key["key_uri"] else "not a configured key"
            rows.append(
                (
                    f"  key {i}",
                    f"{key['scheme']} fingerprint {key['fingerprint']}, {key['wrapped_size']}-byte wrapped key: {named}",
                )
            )
        sizes = result["sizes"]
        if sizes["nonce"]:
            parts = f" = header {sizes['header']} + nonce {sizes['nonce']} + ciphertext {sizes['ciphertext']} + tag {sizes['tag']}"
        else:  # direct mode
            parts = ", all header: the wrapped key is the key service's ciphertext of the payload"
        rows.append(("sizes", f"{sizes['total']} bytes{parts}"))
    if note:
        rows.append(("note", note))
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name + ':':<{width}}{value}")


def _decrypt(args: argparse.Namespace) -> int:
    from .codec import EnvelopeCodec

    message, where = _read_message(args)
    if message.content_type != ENVELOPE_CONTENT_TYPE:
        print(
            f"kombu-envelope decrypt: {where} is not an envelope message (content type {message.content_type!r})",
            file=sys.stderr,
        )
        return 1
    codec = EnvelopeCodec.from_settings(_settings(args))
    _print_json(codec.decode(message.body))
    return 0


# -- doctor ------------------------------------------------------------------------------


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import ERROR, WARNING, run_checks

    findings = run_checks(_load_app(args.app), key_check=not args.skip_key_check)
    if args.json:
        _print_json([vars(f) for f in findings])
    else:
        for f in findings:
            print(f"{f.severity.upper():<8}{f.check:<20}{f.message}")
            if f.fix and f.severity in (ERROR, WARNING):
                print(f"{'':<28}fix: {f.fix}")
    errors = sum(f.severity == ERROR for f in findings)
    warnings = sum(f.severity == WARNING for f in findings)
    if not args.json:
        print(f"\n{errors} error(s), {warnings} warning(s)")
    return 1 if errors or (args.strict and warnings) else 0


# -- audit --------------------------------------------------------------------------------


def _audit_queues(args: argparse.Namespace, reader: Any, settings: Any) -> list[str]:
    if args.queue:
        return list(args.queue)
    names: list[str] = []
    if args.app:
        names = list(_load_app(args.app).amqp.queues)
        if settings.dead_letter_queue:
            names.append(settings.dead_letter_queue)
    names = names or reader.queues()
    if not names:
        raise ConfigurationError(
            "no queue to audit: name them with --queue NAME (AMQP brokers cannot list their queues)"
        )
    return list(dict.fromkeys(names))


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit_queue
    from .queues import BrokerError, open_reader

    settings = _settings(args)
    decode = None
    if args.decrypt:
        from .codec import EnvelopeCodec

        decode = EnvelopeCodec.from_settings(settings).decode
    reports, missing = [], []
    with open_reader(_broker_url(args)) as reader:
        for queue in _audit_queues(args, reader, settings):
            try:
                reports.append(audit_queue(reader, queue, settings, decode, args.limit, args.progress))
            except BrokerError as exc:
                if "does not exist" not in str(exc):
                    raise
                missing.append(queue)
    found = sum(r.plaintext + r.undecodable for r in reports)
    if args.json:
        _print_json({"queues": [r.as_dict() for r in reports], "missing_queues": missing})
    else:
        _print_audit(reports, missing)
    return 1 if found else 0


def _print_audit(reports: list[Any], missing: list[str]) -> None:
    width = max([len(r.queue) for r in reports] + [len(q) for q in missing] + [5]) + 2
    print(f"{'queue':<{width}}{'messages':>10}{'encrypted':>11}{'plaintext':>11}{'undecodable':>13}")
    for r in reports:
        print(f"{r.queue:<{width}}{r.messages:>10}{r.encrypted:>11}{r.plaintext:>11}{r.undecodable:>13}")
        for label, counts in (
            ("plaintext", r.plaintext_content_types),
            ("undecodable", r.undecodable_reasons),
            ("key", r.keys),
        ):
            for what, n in counts.most_common():
                print(f"    {label}: {what}: {n}")
    for queue in missing:
        print(f"{queue:<{width}}  (no such queue)")
    totals = [sum(getattr(r, k) for r in reports) for k in ("messages", "encrypted", "plaintext", "undecodable")]
    print(f"{'total':<{width}}{totals[0]:>10}{totals[1]:>11}{totals[2]:>11}{totals[3]:>13}")
    if totals[2] or totals[3]:
        print(
            f"found {totals[2]} plaintext and {totals[3]} undecodable message(s); every message is still in its queue"
        )
    else:
        print(f"all {totals[0]} message(s) are encrypted; every message is still in its queue")


# -- the parser ------------------------------------------------------------------------


def _add_app(p: argparse.ArgumentParser, required: bool = False, why: str = "") -> None:
    p.add_argument(
        "-A",
        "--app",
        required=required,
        metavar="APP",
        help=f"the Celery app, as for `celery -A` (e.g. proj or proj.celery:app){why}",
    )


def _add_message_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        nargs="?",
        metavar="FILE",
        help="a message: raw envelope bytes, their base64, or a Kombu JSON record; - for stdin",
    )
    p.add_argument(
        "--broker", metavar="URL", help="read the message from this broker (redis://..., amqp://...) instead of a file"
    )
    p.add_argument("--queue", metavar="NAME", help="the queue to read from; the message stays in it")
    p.add_argument(
        "--index", type=int, default=0, metavar="N", help="which message: 0 (default) is the next to be delivered"
    )


_EXAMPLES = {
    "inspect": """examples:
  kombu-envelope inspect --broker redis://localhost:6379/0 --queue celery
  kombu-envelope inspect message.bin
  redis-cli --raw LINDEX celery -1 | kombu-envelope inspect -""",
    "decrypt": """examples:
  kombu-envelope decrypt -A proj --queue celery
  KOMBU_ENVELOPE_KEY_URI=aws-kms://alias/orders kombu-envelope decrypt message.bin""",
    "doctor": """example:
  kombu-envelope doctor -A proj

exit status: 0 no errors, 1 errors found (or warnings, with --strict), 2 could not run""",
    "audit": """examples:
  kombu-envelope audit --broker redis://localhost:6379/0
  kombu-envelope audit -A proj
  kombu-envelope audit --broker amqp://guest:guest@localhost:5672// --queue celery --queue orders

exit status: 0 every message is encrypted, 1 plaintext or undecodable messages found, 2 could not run""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kombu-envelope",
        description="Envelope encryption for Celery/Kombu messages: keys, demo and operator tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Command, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=textwrap.fill(description, 79),
            epilog=_EXAMPLES.get(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(run=run)
        return p

    p = command(
        "keygen",
        _keygen,
        "create a local:// key file (development only)",
        "Create a local:// key file, readable only by its owner.",
    )
    p.add_argument("path", help="where to write the key; must not exist")

    command(
        "demo",
        _demo,
        "run the end-to-end demo in memory, no servers needed",
        "Send, store and run encrypted tasks in one process.",
    )

    p = command(
        "inspect",
        _inspect,
        "show a message's envelope header (no key needed)",
        "Print a message's authenticated header: format version, algorithm, wrapped keys (and the configured key URI "
        "each matches), encryption context, compression and sizes. Calls no key service; reads queues without consuming.",
    )
    _add_message_source(p)
    _add_app(p, why="; names the keys")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        "decrypt",
        _decrypt,
        "print a message's decrypted body (needs key access)",
        "Decrypt a message and print its body as JSON. Settings come from -A or the KOMBU_ENVELOPE_* environment.",
    )
    _add_message_source(p)
    _add_app(p)

    p = command(
        "doctor",
        _doctor,
        "check a Celery app's security configuration",
        "Check serializers, accepted content, header redaction, result_extended, events, dead-lettering, the worker "
        "consumer and the cache limits, and make a real round trip through each key URI.",
    )
    _add_app(p, required=True)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.add_argument("--skip-key-check", action="store_true", help="make no key-service call")

    p = command(
        "audit",
        _audit,
        "count encrypted, plaintext and undecodable messages in queues",
        "Count the messages waiting in queues by kind, without consuming them: every message stays in its queue "
        "(AMQP: each is fetched unacknowledged and requeued in place). Queues: --queue, else the -A app's queues "
        "and its dead-letter queue, else (Redis) every queue Kombu has bound.",
    )
    _add_app(p, why="; its broker, queues and key URIs")
    p.add_argument(
        "--broker", metavar="URL", help="redis://..., rediss://..., amqp://... (default: the app's broker_url)"
    )
    p.add_argument("--queue", action="append", metavar="NAME", help="a queue to scan; repeat for several")
    p.add_argument("--limit", type=int, metavar="N", help="scan at most N messages per queue")
    p.add_argument(
        "--decrypt",
        action="store_true",
        help="also decrypt each envelope (needs key access): forged ones count as undecodable",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
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
