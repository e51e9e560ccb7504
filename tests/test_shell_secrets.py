"""Lines with credentials never reach the persistent shell history."""

from __future__ import annotations

import pytest

from contree_shell.shell.secrets import looks_secret


@pytest.mark.parametrize(
    "line",
    [
        "contree --token abc123 images",
        "contree auth --password=hunter2",
        "export GITHUB_TOKEN=ghp_x",
        "API_KEY=abc python app.py",
        "mysql --password secret",
        "curl -H 'Authorization: Bearer x' https://example.invalid",
        "echo password: hunter2",
    ],
)
def test_secret_lines(line: str) -> None:
    assert looks_secret(line)


@pytest.mark.parametrize(
    "line",
    ["ls /etc", "cat /etc/passwd", "grep token src/*.py", "echo $TOKEN",
     "contree session branch secret-work", "passwd root"],
)
def test_ordinary_lines(line: str) -> None:
    assert not looks_secret(line)
