"""``usage-guard``: read and administer usage counters from a shell.

    usage-guard show acme --user alice --url redis://127.0.0.1:6379/0
    usage-guard keys acme --user alice
    usage-guard assign-plan acme pro
    usage-guard set-limit acme emails 20000        # or: unlimited, or --remove
    usage-guard set-budget acme alice ai_tokens 10000   # or: none
    usage-guard demo --port 8000

The storage URL comes from ``--url`` or ``USAGE_GUARD_URL``; plans (which the
application defines in code) from a JSON file given by ``--plans`` or
``USAGE_GUARD_PLANS``: ``{"default": "free", "plans": {"free": {"ai_tokens": 50000}}}``.
Exit codes: 0 done, 1 Redis unreachable, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from .catalog import DEFAULT_CATALOG, Catalog
from .dashboard.formatting import figure, quantity
from .errors import BackendUnavailable, InvalidUsage
from .guard import UsageGuard
from .keys import KeySpace, encode_id
from .periods import Period, iso_utc, utc_now
from .plans import Plan, load_plans
from .report import MeterReport, PersonalMeterReport, Report

CATALOG_HELP = "the application's catalog, module:attribute (default: $USAGE_GUARD_CATALOG)"
EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2

_ANSI = {"blue": "34", "yellow": "33", "orange": "38;5;208", "red": "31"}
BAR_WIDTH = 20
_PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


class CliError(Exception):
    """A problem to report in one line, with the exit code it means."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _plans(path: str | None, catalog: Catalog) -> tuple[dict[str, Plan], str | None]:
    """The plans of a JSON file, checked against the catalog: a metric it does not
    have is blamed on the file and the line that names it."""
    if not path:
        return {}, None
    try:
        plans, default = load_plans(path)
    except InvalidUsage as error:
        raise CliError(str(error)) from None
    for plan in plans.values():
        for metric in (*plan.limits, *plan.rate_limits):
            if metric not in catalog:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
                line = next((n for n, text in enumerate(lines, 1) if f'"{metric}"' in text), 1)
                raise CliError(
                    f"{path}, line {line}: plan {plan.name!r} names {metric!r}, which is not "
                    "in the catalog (an application's own metrics: --catalog module:name)"
                )
    return plans, default


def _catalog(spec: str | None) -> Catalog:
    """The application's catalog, ``module:attribute`` (default: the built-in one)."""
    if not spec:
        return DEFAULT_CATALOG
    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # as uvicorn and gunicorn find an app's module
        sys.path.insert(0, os.getcwd())
    try:
        catalog = getattr(importlib.import_module(module), name or "catalog")
    except (ImportError, AttributeError) as error:
        raise CliError(f"--catalog {spec}: {error}") from None
    if not isinstance(catalog, Catalog):
        raise CliError(f"--catalog {spec} is a {type(catalog).__name__}, not a usage_guard Catalog")
    return catalog


def _guard(args: argparse.Namespace, catalog: Catalog) -> UsageGuard:
    url = args.url or os.environ.get("USAGE_GUARD_URL")
    if not url:
        raise CliError("no storage URL: pass --url or set USAGE_GUARD_URL")
    plans, default = _plans(args.plans or os.environ.get("USAGE_GUARD_PLANS"), catalog)
    try:
        guard = UsageGuard.from_url(
            url,
            plans=plans,
            default_plan=default,
            catalog=catalog,
            prefix=args.prefix,
            timeout=args.timeout,
        )
    except ValueError as error:
        raise CliError(f"cannot use {_redacted(url)}: {error}") from None
    if url.startswith("memory://") and not guard.backend.sync().command("DBSIZE"):
        print(
            "usage-guard: warning: this memory:// store is empty: it lives in one process "
            "(point --url at the application's Redis)",
            file=sys.stderr,
        )
    return guard


def _paint(text: str, status: str, colour: bool) -> str:
    return f"\033[{_ANSI[status]}m{text}\033[0m" if colour else text


def _bar(percent: float | None, status: str, colour: bool) -> str:
    if percent is None:
        return "·" * BAR_WIDTH
    filled = min(BAR_WIDTH, round(BAR_WIDTH * percent / 100))
    return _paint("█" * filled, status, colour) + "░" * (BAR_WIDTH - filled)


def _percent(percent: float | None) -> str:
    return "unlimited" if percent is None else f"{percent:,.2f}%"


def _meter_line(meter: MeterReport | PersonalMeterReport, colour: bool, width: int) -> str:
    if isinstance(meter, MeterReport):
        cap = meter.limit
        extra = " (soft cap)" if meter.cap == "soft" and cap is not None else ""
    else:
        cap, extra = meter.budget, ""
    amount = (
        quantity(meter.used, meter.unit)
        if cap is None
        else f"{figure(meter.used, meter.unit)} / {quantity(cap, meter.unit)}"
    )
    shared = isinstance(meter, PersonalMeterReport) and cap is None
    percent = "shared pool" if shared else _percent(meter.percent)
    percent = _paint(f"{percent:>11}", meter.status, colour)
    bar = _bar(meter.percent, meter.status, colour)
    return f"  {meter.label:<{width}}  {bar}  {percent}  {amount}{extra}"


def render_report(report: Report, colour: bool) -> str:
    """The ``show`` table: plan and period, meters by category, the user's own meters."""
    period = report.period
    plan = "no plan" if report.plan is None else f"plan {report.plan}"
    lines = [
        f"{report.organization} · {plan} · period {iso_utc(period.start)} → {iso_utc(period.end)}"
    ]
    width = max(len(m.label) for m in report.meters)
    for _, heading, meters in report.by_category():
        lines += ["", heading]
        lines += (_meter_line(m, colour, width) for m in meters)
    if report.personal is not None:
        lines += ["", f"My Usage ({report.personal.user})"]
        lines += (_meter_line(m, colour, width) for m in report.personal.meters)
    return "\n".join(lines)


def _keys(args: argparse.Namespace, catalog: Catalog, out: TextIO) -> None:
    """The exact Redis keys of an org for the current (or given) period."""
    try:
        space = KeySpace(args.prefix, args.org)
        user = None if args.user is None else encode_id(args.user)
    except ValueError as error:
        raise CliError(str(error)) from None
    if args.period is None:
        period = Period.containing(utc_now())
    elif _PERIOD.fullmatch(args.period):
        period = Period.parse(args.period)
    else:
        raise CliError(f"--period must be YYYY-MM (a month, e.g. 2026-11), not {args.period!r}")
    monthly = [m.name for m in catalog if m.monthly]
    cumulative = [m.name for m in catalog if not m.monthly]
    personal = [f"{user or '<user>'}:{m.name}" for m in catalog.personal()]
    # The guard's default history_months (6): the month leaves the history then.
    window = f"at {period.shift(6).key}-01T00:00Z"
    rows = [
        _key_row(
            space.org,
            "hash",
            "plan, limit overrides, current cumulative values",
            "never",
            ["plan", *(f"limit:{m.name}" for m in catalog), "reservations:due", *cumulative],
        ),
        _key_row(space.budgets, "hash", "personal budgets", "never", personal),
        _key_row(
            space.meters(period.key),
            "hash",
            "the month's meters: monthly counts, cumulative last values, thresholds",
            window,
            [
                *monthly,
                *cumulative,
                *(f"t:{m}" for m in monthly + cumulative),
                *(f"s:{m}" for m in cumulative),
            ],
        ),
        _key_row(
            space.personal(period.key),
            "hash",
            "personal counts of the month" + (f": {', '.join(personal)}" if user else ""),
            "dropped by the next month's first personal count, else " + window,
            personal,
        ),
        _key_row(space.base + "idem:*", "string", "idempotent consumptions", "24 h", []),
        _key_row(
            space.reservations,
            "zset",
            "open reservations by deadline (ms)",
            "after the last deadline",
            [],
        ),
        _key_row(
            space.held,
            "hash",
            "estimates open reservations hold, per counter",
            "with the reservations",
            ["m:<YYYY-MM>:<metric>", "u:<YYYY-MM>:<user>:<metric>", "org:<metric>"],
        ),
        _key_row(
            space.base + "r:*",
            "string",
            "reservations not yet settled or cancelled",
            "after their deadline",
            [],
        ),
        _key_row(
            space.base + "rl:*",
            "list",
            "rate limit windows: request times (ms)",
            "after the window",
            [],
        ),
    ]
    if args.json:
        out.write(json.dumps({"org": args.org, "period": period.key, "keys": rows}, indent=2))
        out.write("\n")
        return
    width = max(len(row["key"]) for row in rows)
    for row in rows:
        out.write(f"{row['key']:<{width}}  {row['type']:<6}  {row['holds']}\n")
    out.write(f"\n# redis-cli HGETALL '{space.meters(period.key)}'\n")
    out.write(f"# redis-cli --scan --pattern '{space.base}*'\n")


def _key_row(key: str, kind: str, holds: str, expires: str, fields: list[str]) -> dict[str, Any]:
    return {"key": key, "type": kind, "holds": holds, "expires": expires, "fields": fields}


def _count(text: str, what: str, *, none_words: tuple[str, ...]) -> int | None:
    if text.lower() in none_words:
        return None
    cleaned = text.replace(",", "").replace("_", "")
    if not (cleaned.isascii() and cleaned.isdigit()):
        raise CliError(f"{what} must be a whole number or one of {', '.join(none_words)}: {text!r}")
    return int(cleaned)


def _run(args: argparse.Namespace, out: TextIO) -> None:
    if args.command == "keys":
        _keys(args, _catalog(args.catalog or os.environ.get("USAGE_GUARD_CATALOG")), out)
        return
    if args.command == "demo":
        from .demo import run

        run(host=args.host, port=args.port)
        return
    guard = _guard(args, _catalog(args.catalog or os.environ.get("USAGE_GUARD_CATALOG")))
    url = _redacted(args.url or os.environ.get("USAGE_GUARD_URL", ""))
    try:
        if args.command == "show":
            if not guard.calls.plans.names:
                print(
                    "usage-guard: warning: no plans given (--plans or USAGE_GUARD_PLANS): "
                    "limits shown are the org's own overrides only",
                    file=sys.stderr,
                )
            report = guard.report(args.org, args.user)
            if args.json:
                out.write(json.dumps(report.to_dict(), indent=2) + "\n")
            else:
                colour = _wants_colour(args.color, out)
                out.write(render_report(report, colour) + "\n")
        elif args.command == "assign-plan":
            plan = None if args.plan.lower() in ("default", "none") else args.plan
            guard.assign_plan(args.org, plan)
            out.write(f"{args.org}: plan {plan or '(default)'}, limit overrides cleared\n")
        elif args.command == "set-limit":
            if args.remove:
                guard.remove_limit(args.org, args.metric)
                out.write(f"{args.org}: {args.metric} override removed (the plan decides)\n")
            else:
                if args.limit is None:
                    raise CliError("set-limit needs LIMIT (a number or 'unlimited') or --remove")
                limit = _count(args.limit, "LIMIT", none_words=("unlimited", "null", "none"))
                guard.set_limit(args.org, args.metric, limit)
                shown = "unlimited" if limit is None else f"{limit:,}"
                out.write(f"{args.org}: {args.metric} limit {shown}\n")
        elif args.command == "set-budget":
            budget = _count(args.budget, "BUDGET", none_words=("none", "null", "remove"))
            guard.set_budget(args.org, args.user, args.metric, budget)
            shown = "removed (shared pool)" if budget is None else f"{budget:,} a month"
            out.write(f"{args.org}: {args.user}'s {args.metric} budget {shown}\n")
    except InvalidUsage as error:
        raise CliError(str(error)) from None
    except BackendUnavailable as error:
        raise CliError(f"cannot reach Redis at {url}: {error}", EXIT_UNAVAILABLE) from None
    finally:
        guard.close()


def _wants_colour(choice: str, out: TextIO) -> bool:
    if choice != "auto":
        return choice == "always"
    return out.isatty() and "NO_COLOR" not in os.environ


def _version() -> str:
    from importlib.metadata import version

    return version("usage_guard")


def parser() -> argparse.ArgumentParser:
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument("--url", help="storage URL (default: $USAGE_GUARD_URL)")
    storage.add_argument("--prefix", default="ug", help="key prefix (default: ug)")
    storage.add_argument("--plans", help="plans JSON file (default: $USAGE_GUARD_PLANS)")
    storage.add_argument("--timeout", type=float, default=2.0, help="seconds per reply")
    storage.add_argument("--catalog", help=CATALOG_HELP)
    root = argparse.ArgumentParser(
        prog="usage-guard", description="Read and administer usage_guard counters."
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", parents=[storage], help="an org's meters and period")
    show.add_argument("org")
    show.add_argument("--user", help="also show this user's personal meters")
    show.add_argument("--json", action="store_true", help="the report as JSON")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    keys = commands.add_parser("keys", help="the exact Redis keys of an org (for redis-cli)")
    keys.add_argument("org")
    keys.add_argument("--user", help="also list this user's personal counters")
    keys.add_argument("--period", help="YYYY-MM (default: the current month, UTC)")
    keys.add_argument("--prefix", default="ug", help="key prefix (default: ug)")
    keys.add_argument("--catalog", help=CATALOG_HELP)
    keys.add_argument(
        "--json", action="store_true", help="the keys, their fields and expiry as JSON"
    )

    assign = commands.add_parser("assign-plan", parents=[storage], help="put an org on a plan")
    assign.add_argument("org")
    assign.add_argument("plan", help="a configured plan, or 'default'")

    limit = commands.add_parser("set-limit", parents=[storage], help="override one org limit")
    limit.add_argument("org")
    limit.add_argument("metric")
    limit.add_argument("limit", nargs="?", help="a number, or 'unlimited'")
    limit.add_argument("--remove", action="store_true", help="drop the override")

    budget = commands.add_parser("set-budget", parents=[storage], help="a user's monthly budget")
    budget.add_argument("org")
    budget.add_argument("user")
    budget.add_argument("metric")
    budget.add_argument("budget", help="a number, or 'none' to remove it")

    demo = commands.add_parser("demo", help="serve the example app with a seeded organization")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    return root


def _show_warnings() -> None:
    """Print the guard's logged warnings (e.g. an org on a plan this CLI was not given).

    Its outage errors are left out: the CLI reports them itself, once, with the exit code.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("usage-guard: warning: %(message)s"))
    handler.addFilter(lambda record: record.levelno < logging.ERROR)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """The console script; returns the exit code."""
    args = parser().parse_args(argv)
    stream = out or sys.stdout
    _show_warnings()
    try:
        _run(args, stream)
    except CliError as error:
        print(f"usage-guard: error: {error}", file=sys.stderr)
        return error.code
    except BrokenPipeError:
        # The reader went away (`usage-guard keys acme | head`): nothing left to say, and
        # Python must not complain when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
