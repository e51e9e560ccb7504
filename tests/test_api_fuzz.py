"""Property-based fuzzing of the server against the API spec it serves (schemathesis).

Every operation of the spec gets a bounded, deterministic set of generated requests
(FUZZ_EXAMPLES each, derandomized); each response must not be a 5xx and must conform
to the spec's response schema for its status. Skipped when schemathesis is missing
(it is a dev dependency).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
yaml = pytest.importorskip("yaml")

from hypothesis import HealthCheck, settings  # noqa: E402

from tests.test_server_support import import_busybox, start_api_server  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CONTREE_FUZZ_EXAMPLES", "25"))
GENERATED: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox engine needs root")
    port = _free_port()
    srv = start_api_server(tmp_path_factory.mktemp("fuzz"), "--listen", f"127.0.0.1:{port}",
                           env={"CONTREE_DEFAULT_NETWORKING": "0",
                                "CONTREE_DEFAULT_TIMEOUT": "5"})
    try:
        with srv.http() as http:
            import_busybox(http)
        token = (srv.home / "token").read_text().strip()
        base = f"http://127.0.0.1:{port}/v1"
        headers = {"Authorization": f"Bearer {token}"}
        spec = httpx.get(f"{base}/openapi.yaml", headers=headers, timeout=30)
        assert spec.status_code == 200
        yield {"spec": yaml.safe_load(spec.text), "base": base, "headers": headers}
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_target: dict[str, Any]) -> Any:
    return schemathesis.from_dict(fuzz_target["spec"], base_url=fuzz_target["base"])


schema = schemathesis.from_pytest_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_answers_every_generated_request_within_the_spec(
        case: Any, fuzz_target: dict[str, Any]) -> None:
    GENERATED.append(f"{case.method} {case.path}")
    # A followed event stream of a live operation would never end: bound every call.
    if case.query and "follow" in case.query:
        case.query["follow"] = "0"
    response = case.call(headers=fuzz_target["headers"], timeout=30, allow_redirects=False)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if case.method.upper() == "HEAD":
        return  # no body to check against a schema
    case.validate_response(
        response,
        checks=(
            schemathesis.checks.not_a_server_error,
            schemathesis.checks.response_schema_conformance,
        ),
    )


def test_fuzzing_generated_cases() -> None:
    # Runs after the parametrized cases (file order); a report line for the record.
    if not GENERATED:
        pytest.skip("no fuzz case ran")
    print(f"\n{len(GENERATED)} generated cases over {len(set(GENERATED))} method/paths")
