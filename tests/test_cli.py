"""The ``usage-guard`` console script: in process on memory://NAME, as a subprocess on Redis."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import REDIS_URL, USAGE_GUARD, delete_prefix
from usage_guard import Period, Plan, UsageGuard
from usage_guard.cli import main
from usage_guard.periods import utc_now

PLANS = {
    "free": Plan("free", {"emails": 100, "ai_tokens": 10_000}),
    "pro": Plan("pro", {"emails": 20_000, "ai_tokens": 1_000_000, "storage": 10_000_000_000}),
}
PLANS_JSON = {
    "default": "free",
    "plans": {name: dict(plan.limits) for name, plan in PLANS.items()},
}


@pytest.fixture
def plans_file(tmp_path: Path) -> str:
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(PLANS_JSON))
    return str(path)


@pytest.fixture
def url() -> str:
    """A memory:// server shared by name within this process: the CLI sees the test's data."""
    return f"memory://cli-{uuid.uuid4().hex}"


@pytest.fixture
def guard(url: str) -> Iterator[UsageGuard]:
    guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free")
    guard.assign_plan("acme", "pro")
    guard.consume("acme", "ai_tokens", 850_000, user="alice").raise_for_status()
    guard.consume("acme", "emails", 19_000).raise_for_status()
    guard.set_usage("acme", "storage", 3_400_000_000)
    guard.set_budget("acme", "alice", "ai_tokens", 1_000_000)
    yield guard
    guard.close()


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_show_prints_the_period_and_a_table_of_meters(
    guard: UsageGuard, url: str, plans_file: str
) -> None:
    code, out = run("show", "acme", "--user", "alice", "--url", url, "--plans", plans_file)
    assert code == 0
    period = Period.containing(utc_now())
    assert out.splitlines()[0] == (
        f"acme · plan pro · period {period.key}-01T00:00:00Z → {period.shift(1).key}-01T00:00:00Z"
    )
    lines = {
        line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")
    }
    assert "85.00%" in lines["AI tokens"] and "850 K / 1 M tokens" in lines["AI tokens"]
    assert "95.00%" in lines["Emails sent"] and "19 K / 20 K emails" in lines["Emails sent"]
    assert "3.4 GB / 10 GB" in lines["Storage"]
    assert "unlimited" in lines["API calls"]
    assert "My Usage (alice)" in out
    assert "shared pool" in lines["Enrichments"] and "unlimited" not in lines["Enrichments"]
    assert "\033[" not in out  # not a terminal: no colour


def test_show_colours_bars_by_status(guard: UsageGuard, url: str, plans_file: str) -> None:
    code, out = run("show", "acme", "--url", url, "--plans", plans_file, "--color", "always")
    assert code == 0
    ai_tokens = next(line for line in out.splitlines() if "AI tokens" in line)
    emails = next(line for line in out.splitlines() if "Emails sent" in line)
    assert "\033[33m" in ai_tokens  # yellow at 85 %
    assert "\033[38;5;208m" in emails  # orange at 95 %


def test_show_json_is_the_report(guard: UsageGuard, url: str, plans_file: str) -> None:
    code, out = run("show", "acme", "--json", "--url", url, "--plans", plans_file)
    assert code == 0
    assert json.loads(out) == guard.report("acme").to_dict()


def test_url_from_the_environment(
    guard: UsageGuard, url: str, plans_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USAGE_GUARD_URL", url)
    monkeypatch.setenv("USAGE_GUARD_PLANS", plans_file)
    code, out = run("show", "acme")
    assert code == 0 and "plan pro" in out


def test_admin_commands_change_the_org(guard: UsageGuard, url: str, plans_file: str) -> None:
    options = ("--url", url, "--plans", plans_file)
    assert run("assign-plan", "acme", "free", *options) == (
        0,
        "acme: plan free, limit overrides cleared\n",
    )
    assert guard.report("acme").plan == "free"
    assert run("set-limit", "acme", "emails", "25,000", *options)[0] == 0
    assert guard.report("acme").meter("emails").limit == 25_000
    assert run("set-limit", "acme", "emails", "unlimited", *options)[0] == 0
    assert guard.report("acme").meter("emails").limit is None
    assert run("set-limit", "acme", "emails", "--remove", *options)[0] == 0
    assert guard.report("acme").meter("emails").limit == 100
    assert run("set-budget", "acme", "bob", "ai_tokens", "5000", *options) == (
        0,
        "acme: bob's ai_tokens budget 5,000 a month\n",
    )
    personal = guard.report("acme", user="bob").personal
    assert personal is not None and personal.meters[0].budget == 5_000
    assert run("set-budget", "acme", "bob", "ai_tokens", "none", *options)[0] == 0
    personal = guard.report("acme", user="bob").personal
    assert personal is not None and personal.meters[0].shared_pool


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set-limit", "acme", "emails", "12x"], "LIMIT must be a whole number"),
        (["set-limit", "acme", "emails"], "needs LIMIT"),
        (["set-limit", "acme", "nope", "5"], "unknown metric 'nope'"),
        (["set-budget", "acme", "bob", "emails", "5"], "emails takes no personal budgets"),
        (["set-budget", "acme", "bob", "ai_tokens", "-5"], "BUDGET must be a whole number"),
        (["set-budget", "acme", "bob", "ai_tokens", "\u00b2"], "BUDGET must be a whole number"),
        (["assign-plan", "acme", "platinum"], "unknown plan 'platinum'"),
        (["show", "x" * 300], "ids must have 1 to 256 characters"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    guard: UsageGuard,
    url: str,
    plans_file: str,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = guard.report("acme").to_dict()
    assert run(*argv, "--url", url, "--plans", plans_file)[0] == 2
    error = capsys.readouterr().err
    assert error.startswith("usage-guard: error: ") and message in error
    assert guard.report("acme").to_dict() == before


def test_missing_url_and_bad_plans_file_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("USAGE_GUARD_URL", raising=False)
    assert run("show", "acme")[0] == 2
    assert "pass --url or set USAGE_GUARD_URL" in capsys.readouterr().err
    broken = tmp_path / "plans.json"
    broken.write_text("{nope")
    assert run("show", "acme", "--url", "memory://", "--plans", str(broken))[0] == 2
    assert f"cannot read plans from {broken}" in capsys.readouterr().err
    assert run("show", "acme", "--url", "ftp://example")[0] == 2
    assert "cannot use ftp://example" in capsys.readouterr().err


def test_unreachable_redis_exits_1_without_leaking_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _ = run("show", "acme", "--url", "redis://:hunter2@127.0.0.1:1/0", "--timeout", "0.5")
    assert code == 1
    error = capsys.readouterr().err
    assert "usage-guard: error: cannot reach Redis at redis://:***@127.0.0.1:1/0" in error
    assert "hunter2" not in error


def test_keys_lists_the_exact_layout() -> None:
    code, out = run("keys", "acme", "--user", "bo b", "--period", "2027-02", "--prefix", "app")
    assert code == 0
    keys = [line.split()[0] for line in out.splitlines() if line.startswith("app:")]
    assert keys[:4] == [
        "app:{acme}:org",
        "app:{acme}:budgets",
        "app:{acme}:m:2027-02",
        "app:{acme}:u:2027-02",
    ]
    assert "bo%20b:ai_tokens, bo%20b:enrichments" in out
    assert "redis-cli HGETALL 'app:{acme}:m:2027-02'" in out
    assert out.rstrip().endswith("redis-cli --scan --pattern 'app:{acme}:*'")
    assert run("keys", "acme", "--period", "2027-13")[0] == 2


def test_keys_as_json_name_every_key_and_field_the_scripts_write(url: str) -> None:
    now = [datetime(2026, 10, 5, tzinfo=timezone.utc)]
    guard = UsageGuard.from_url(url, plans=PLANS, default_plan="free", clock=lambda: now[0])
    guard.set_usage("acme", "contacts", 5)
    now[0] = datetime(2026, 12, 5, tzinfo=timezone.utc)  # after a month without a change
    guard.set_budget("acme", "alice", "ai_tokens", 10_000)
    guard.consume("acme", {m.name: 1 for m in guard.catalog}, user="alice", idempotency_key="k")
    guard.consume("acme", "emails", 99).raise_for_status()  # 100 % of free's 100
    guard.reserve("acme", "ai_tokens", 10, user="alice")
    code, out = run("keys", "acme", "--user", "alice", "--period", "2026-12", "--json")
    assert code == 0
    listed = {row["key"]: row for row in json.loads(out)["keys"]}
    assert listed["ug:{acme}:org"]["expires"] == "never"
    patterns = {key.removesuffix("*"): row for key, row in listed.items() if key.endswith("*")}
    command = guard.backend.sync().command
    written = command("KEYS", "ug:{acme}:*")
    assert len(written) == 9, written
    for key in written:
        # An earlier month's hash has the fields of this month's.
        row = listed.get(key.replace(":m:2026-10", ":m:2026-12")) or next(
            row for prefix, row in patterns.items() if key.startswith(prefix)
        )
        if row["type"] == "hash" and key != "ug:{acme}:held":
            assert set(command("HKEYS", key)) <= set(row["fields"]), key
    assert "s:contacts" in command("HKEYS", "ug:{acme}:m:2026-12")
    assert "t:emails" in command("HKEYS", "ug:{acme}:m:2026-12")
    guard.close()


def test_entry_point_runs_as_a_console_script() -> None:
    keys = subprocess.run(
        [USAGE_GUARD, "keys", "acme"], capture_output=True, text=True, timeout=60, check=False
    )
    assert keys.returncode == 0 and "ug:{acme}:org" in keys.stdout
    down = subprocess.run(
        [USAGE_GUARD, "show", "acme", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "USAGE_GUARD_URL": "redis://127.0.0.1:1/0"},
    )
    assert down.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in down.stderr
    bad = subprocess.run(
        [USAGE_GUARD, "show"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "usage:" in bad.stderr


@pytest.mark.real_redis
def test_console_script_on_real_redis(plans_file: str) -> None:
    prefix = f"ugcli{uuid.uuid4().hex[:8]}"
    guard = UsageGuard.from_url(REDIS_URL, plans=PLANS, default_plan="free", prefix=prefix)
    try:
        guard.consume("acme", "emails", 90).raise_for_status()
        options = ["--url", REDIS_URL, "--prefix", prefix, "--plans", plans_file]

        def usage_guard(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [USAGE_GUARD, *argv, *options],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        shown = usage_guard("show", "acme")
        assert shown.returncode == 0, shown.stderr
        assert "90.00%" in shown.stdout and "plan free" in shown.stdout
        assert usage_guard("set-limit", "acme", "emails", "1000").returncode == 0
        assert guard.report("acme").meter("emails").limit == 1000
        assert usage_guard("set-budget", "acme", "al", "enrichments", "x").returncode == 2
    finally:
        guard.close()
        delete_prefix(REDIS_URL, prefix)


def test_demo_on_a_busy_port_says_so_and_names_the_option() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run(
            [USAGE_GUARD, "demo", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "Usage page" not in done.stdout  # no URL printed that does not work


def test_an_org_without_a_plan_reads_no_plan(url: str) -> None:
    UsageGuard.from_url(url).consume("solo", "emails", 1)
    code, out = run("show", "solo", "--url", url)
    assert code == 0 and out.startswith("solo · no plan · period ")


def test_an_empty_memory_store_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("show", "acme", "--url", f"memory://empty-{uuid.uuid4().hex}")[0] == 0
    assert "this memory:// store is empty: it lives in one process" in capsys.readouterr().err


def test_a_plans_file_naming_an_unknown_metric_is_blamed_with_its_line(
    tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plans.json"
    path.write_text('{"default": "free",\n "plans": {"free": {"emails": 10,\n  "smss": 5}}}\n')
    assert run("show", "acme", "--url", url, "--plans", str(path))[0] == 2
    assert f"{path}, line 3: plan 'free' names 'smss'" in capsys.readouterr().err


def test_an_applications_own_catalog_in_show_and_keys(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "app_catalog.py").write_text(
        "from usage_guard import DEFAULT_CATALOG, Metric\n"
        'catalog = DEFAULT_CATALOG.with_metrics(Metric("sms", "SMS sent", "monthly_activity"))\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from app_catalog import catalog  # type: ignore[import-not-found]

    UsageGuard.from_url(url, catalog=catalog).consume("acme", "sms", 3)
    path = tmp_path / "plans.json"
    path.write_text('{"plans": {"free": {"sms": 10}}}')
    code, out = run("show", "acme", "--url", url, "--catalog", "app_catalog:catalog")
    assert code == 0 and "SMS sent" in out
    code, out = run("keys", "acme", "--json", "--catalog", "app_catalog")
    meters = next(row for row in json.loads(out)["keys"] if ":m:" in row["key"])
    assert "sms" in meters["fields"]
    assert run("show", "acme", "--url", url, "--plans", str(path))[0] == 2  # sms: unknown
    assert "line 1: plan 'free' names 'sms'" in capsys.readouterr().err
    assert run("show", "acme", "--url", url, "--catalog", "app_catalog:nope")[0] == 2


def test_a_reader_that_goes_away_is_no_error() -> None:
    """``usage-guard keys acme | head -1``: the pipe closes before the output is written."""
    proc = subprocess.Popen(
        [USAGE_GUARD, "keys", "acme", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the command has started
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == ""
    proc.stderr.close()
