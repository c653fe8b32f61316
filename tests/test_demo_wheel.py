"""``usage-guard demo`` from an installed wheel, outside the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the built wheel; its dependencies come from this environment
    (a .pth file), so nothing is downloaded but the build backend."""
    where = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(where), str(ROOT)],
        check=True,
    )
    (wheel,) = where.glob("usage_guard-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This environment's packages, after the venv's own: the wheel's usage_guard wins.
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    return venv


def test_the_wheel_serves_the_demo_page(installed: Path, tmp_path: Path) -> None:
    located = subprocess.run(
        [installed / "bin" / "python", "-c", "import usage_guard; print(usage_guard.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert located.startswith(str(installed)), located  # not the source tree's
    with subprocess.Popen(
        [installed / "bin" / "usage-guard", "demo", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    ) as demo:
        try:
            serves_the_demo(demo)
        finally:
            demo.terminate()
            demo.wait(10)


def answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bool(response.status == 200)


def serves_the_demo(demo: subprocess.Popen[str]) -> None:
    assert demo.stdout is not None
    url = ""
    while not url:
        line = demo.stdout.readline()
        assert line, demo.stderr.read() if demo.stderr else "the demo exited"
        if line.startswith("Usage page: "):
            url = line.removeprefix("Usage page: ").strip()
    wait_for(lambda: answers(url), what="the page")
    with urllib.request.urlopen(url, timeout=5) as page:
        html = page.read().decode()
    assert "acme" in html and "AI tokens" in html
    root = url.removesuffix("settings/usage/")
    request = urllib.request.Request(f"{root}v1/ai/complete?max_tokens=300", method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200 and b'"tokens":100' in answer.read()
