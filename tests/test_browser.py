"""A real headless Chromium on the running demo (``usage-guard demo``): colours, charts, forms;
and on the Flask and Django examples' pages.

Screenshots at desktop and phone width land in ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from conftest import USAGE_GUARD, free_port, wait_for

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser
COLOURS = {
    "blue": "rgb(59, 130, 246)",
    "yellow": "rgb(183, 121, 31)",
    "orange": "rgb(234, 88, 12)",
    "red": "rgb(220, 38, 38)",
}


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    """``usage-guard demo`` in a subprocess; the URL it prints."""
    port = free_port()
    process = subprocess.Popen(
        [USAGE_GUARD, "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        printed = [process.stdout.readline() for _ in range(2)]
        url = printed[1].removeprefix("Usage page:").strip()
        assert url == f"http://127.0.0.1:{port}/settings/usage/", printed
        wait_for(lambda: _up(url), timeout=30, what="the demo server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
#: Both sites of the cross-site test live on loopback, where Chromium's Local Network
#: Access checks would stop the attack before it is sent; on the web nothing does.
LOOPBACK_ATTACKS = "--disable-features=LocalNetworkAccessChecks,BlockInsecurePrivateNetworkRequests"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    yield browser
    browser.close()


def fill_colour(page: Page, section: str, metric: str) -> str:
    selector = f'section[aria-labelledby="{section}"] li[data-metric="{metric}"] .fill'
    return str(page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor"))


def assert_usage_page_of_acme(page: Page) -> None:
    assert page.title() == "Usage · acme"
    assert [text.strip() for text in page.locator("h2").all_text_contents()][:4] == [
        "Plan overview",
        "Organization usage",
        "My Usage",
        "Usage history",
    ]


def test_demo_page_in_chromium_desktop(browser: Browser, demo_url: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    response = page.goto(demo_url)
    assert response is not None and response.status == 200
    assert_usage_page_of_acme(page)
    # The seeded meters show every colour, as painted by the browser.
    assert fill_colour(page, "org-heading", "users") == COLOURS["blue"]
    assert fill_colour(page, "org-heading", "ai_tokens") == COLOURS["yellow"]
    assert fill_colour(page, "org-heading", "emails") == COLOURS["orange"]
    assert fill_colour(page, "org-heading", "enrichments") == COLOURS["red"]
    assert fill_colour(page, "org-heading", "contacts") == COLOURS["red"]  # soft cap, 104 %
    assert fill_colour(page, "mine-heading", "ai_tokens") == COLOURS["yellow"]

    bar = page.locator('[role="progressbar"][aria-labelledby="label-ai_tokens"]')
    assert bar.get_attribute("aria-valuenow") == "85.0"
    assert page.locator('[role="progressbar"]').count() == 12  # 11 limited meters + 1 budget
    # Four 6-month area charts, drawn with a real size, and a sparkline beside each meter.
    charts = page.locator("svg.area-chart")
    assert charts.count() == 4
    for index in range(4):
        box = charts.nth(index).bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
    assert page.locator("li.meter svg.spark").count() == 12
    assert (
        page.locator(".x-labels").first.inner_text().split()
        == page.locator(".x-labels").last.inner_text().split()
    )
    page.screenshot(path=str(ARTIFACTS / "usage-desktop.png"), full_page=True)
    page.close()


def test_demo_page_in_chromium_phone(browser: Browser, demo_url: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(demo_url)
    # Nothing wider than the phone: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert fill_colour(page, "org-heading", "enrichments") == COLOURS["red"]
    box = page.locator("svg.area-chart").first.bounding_box()
    assert box is not None and 300 < box["width"] <= 390
    page.screenshot(path=str(ARTIFACTS / "usage-phone.png"), full_page=True)
    page.close()


def set_budget_with_the_form(page: Page, demo_url: str, user: str, budget: int) -> Any:
    """Submit the page's budget form as a person would; the user's report afterwards."""
    page.goto(demo_url)
    page.fill("#budget-user", user)
    page.select_option("#budget-metric", "enrichments")
    page.fill("#budget-value", str(budget))
    page.click("text=Save budget")
    page.wait_for_load_state()
    assert page.url == demo_url
    headers = {"x-org-id": "acme", "x-user-id": user}
    return httpx.get(demo_url + "report.json", headers=headers).json()


def test_admin_form_works_without_javascript(browser: Browser, demo_url: str) -> None:
    context = browser.new_context(java_script_enabled=False)
    report = set_budget_with_the_form(context.new_page(), demo_url, "dora", 1500)
    assert report["personal"]["meters"][1] == {
        "metric": "enrichments",
        "used": 0,
        "budget": 1500,
        "shared_pool": False,
        "percent": 0.0,
        "status": "blue",
    }
    context.close()


ATTACK_PAGE = """<!doctype html><title>a cat picture</title>
<form id="plain" method="post" enctype="text/plain" action="{target}plan" target="sink">
  <input name='{{"plan": "free", "x": "' value='"}}'></form>
<form id="urlencoded" method="post" action="{target}limits" target="sink">
  <input name="metric" value="emails"><input name="limit" value=""></form>
<iframe name="sink"></iframe>
<script>
  document.getElementById("plain").submit();
  setTimeout(() => document.getElementById("urlencoded").submit(), 300);
  fetch("{target}budgets", {{method: "POST", mode: "no-cors", credentials: "include",
        body: "user=alice&metric=ai_tokens&budget="}}).finally(() => document.title = "done");
</script>"""


def test_another_site_cannot_change_anything(playwright: Playwright, demo_url: str) -> None:
    # The attacker's page on http://localhost:P is another site than http://127.0.0.1:Q;
    # the demo takes its visitor for acme's admin, as a session cookie would.
    before = httpx.get(demo_url + "report.json").json()
    attacker = f"http://localhost:{free_port()}/"
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*FLAGS, LOOPBACK_ATTACKS])
    page = browser.new_page()
    page.route(
        attacker,
        lambda route: route.fulfill(
            content_type="text/html", body=ATTACK_PAGE.format(target=demo_url)
        ),
    )
    refused: list[int] = []
    page.on("response", lambda r: refused.append(r.status) if r.url.startswith(demo_url) else None)
    page.goto(attacker)
    page.wait_for_function("document.title === 'done'")
    page.wait_for_timeout(800)  # the second form
    browser.close()
    assert sorted(refused) == [403, 403, 403]
    after = httpx.get(demo_url + "report.json").json()
    assert after == before


def test_the_pages_own_form_works_under_referrer_policy_no_referrer(
    browser: Browser, demo_url: str
) -> None:
    # Under "no-referrer" Chromium sends "Origin: null" with the page's own form posts.
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()

    def no_referrer(route: Any) -> None:
        response = route.fetch()
        route.fulfill(
            response=response, headers={**response.headers, "referrer-policy": "no-referrer"}
        )

    page.route(demo_url, no_referrer)
    report = set_budget_with_the_form(page, demo_url, "erin", 700)
    assert report["personal"]["meters"][1]["budget"] == 700
    context.close()


#: The example apps, each serving the same Usage page through its framework's adapter.
EXAMPLES = {
    "flask": ["gunicorn", "-w", "1", "-b", "127.0.0.1:{port}", "examples.flask_app.app:app"],
    "django": ["uvicorn", "--host", "127.0.0.1", "--port", "{port}",
               "examples.django_app.asgi:application"],
}  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=EXAMPLES)
def example_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """An example app on memory:// in one worker, with some use through its API; the
    URL of its Usage page."""
    port = free_port()
    command = [arg.format(port=port) for arg in EXAMPLES[request.param]]
    env = {**os.environ, "USAGE_GUARD_URL": "memory://"}
    process = subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(f"{base}/health"), timeout=30, what=f"the {request.param} example")
        alice = {"x-org-id": "acme", "x-user-id": "alice"}
        for _ in range(85):
            email = httpx.post(
                f"{base}/v1/emails", json={"to": "a@x", "subject": "s"}, headers=alice
            )
            assert email.status_code == 200
        yield f"{base}/settings/usage/"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_every_frameworks_page_in_chromium(
    browser: Browser, example_url: str, request: pytest.FixtureRequest
) -> None:
    framework = request.node.callspec.params["example_url"]
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    response = page.goto(example_url)
    assert response is not None and response.status == 200
    assert_usage_page_of_acme(page)
    bar = page.locator('[role="progressbar"][aria-labelledby="label-emails"]')
    assert bar.get_attribute("aria-valuenow") == "85.0"
    assert fill_colour(page, "org-heading", "emails") in COLOURS.values()
    assert page.locator("svg.area-chart").count() == 4
    assert page.locator("form").count() == 3  # the demo visitor is acme's admin
    page.screenshot(path=str(ARTIFACTS / f"usage-{framework}-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / f"usage-{framework}-phone.png"), full_page=True)
    page.close()


def test_every_frameworks_forms_work_without_javascript(browser: Browser, example_url: str) -> None:
    """Django's forms carry its CSRF token; Flask's rely on the page's origin check."""
    context = browser.new_context(java_script_enabled=False)
    report = set_budget_with_the_form(context.new_page(), example_url, "dora", 1500)
    [enrichments] = [m for m in report["personal"]["meters"] if m["metric"] == "enrichments"]
    assert enrichments["budget"] == 1500
    context.close()
