"""Property-based fuzzing of the server against the API spec it serves (schemathesis).

Every operation of the spec gets a bounded, deterministic set of generated requests
(FUZZ_EXAMPLES each, derandomized); each response must not be a 5xx and must conform
to the spec's response schema for its status. Skipped when schemathesis is missing
(a dev dependency: schemathesis 4.x, or 3.39 with hypothesis<6.131).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
yaml = pytest.importorskip("yaml")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests.test_server_support import import_busybox, start_api_server  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CONTREE_FUZZ_EXAMPLES", "25"))
GENERATED: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The contract lives beside the repository (shared/api), not in the package: it is the
# official spec, read as it is published.
SPEC = Path(__file__).resolve().parents[2] / "shared" / "api" / "contree-openapi.yaml"


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox engine needs root")
    if not SPEC.exists():
        pytest.skip("the API contract (shared/api/contree-openapi.yaml) is not beside the repo")
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
        yield {"spec": yaml.safe_load(SPEC.read_text()), "base": base, "headers": headers}
    finally:
        srv.stop()


_V4 = int(schemathesis.__version__.split(".")[0]) >= 4
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402


def _load(spec: dict[str, Any], base: str) -> Any:
    if _V4:
        return schemathesis.openapi.from_dict(spec)
    return schemathesis.from_dict(spec, base_url=base)


def _check_case(case: Any, target: dict[str, Any]) -> None:
    GENERATED.append(f"{case.method} {case.path}")
    # A followed event stream of a live operation would never end: bound every call.
    if case.query and "follow" in case.query:
        case.query["follow"] = "0"
    response = case.call(base_url=target["base"], headers=target["headers"],
                         timeout=30, allow_redirects=False)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if case.method.upper() == "HEAD":
        return  # no body to check against a schema
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


def _strategies(operation: Any) -> list[Any]:
    """Valid requests, and invalid ones (which must get a 4xx, never a 5xx)."""
    if _V4:
        from schemathesis import GenerationMode

        modes: list[Any] = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        return [operation.as_strategy(generation_mode=m) for m in modes]
    # 3.x cannot build negative cases for several of the spec's path parameters.
    return [operation.as_strategy()]


def test_api_answers_every_generated_request_within_the_spec(
        fuzz_target: dict[str, Any]) -> None:
    """Each operation: FUZZ_EXAMPLES derandomized valid and as many invalid requests; no
    5xx, and every answer valid against the spec's schema for its status.

    Hypothesis is driven directly (not through schemathesis' pytest plugin, whose
    fixture support lags behind pytest releases).
    """
    schema = _load(fuzz_target["spec"], fuzz_target["base"])
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25  # every path + method of the spec

    for operation, strategy in [(op, st) for op in operations for st in _strategies(op)]:

        @given(case=strategy)
        @settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit,
                  Phase.generate])
        def fuzz(case: Any) -> None:
            _check_case(case, fuzz_target)

        try:
            fuzz()
        except Exception as exc:  # collect every operation's first failure
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:2000])
    assert not failures, "\n\n".join(failures)
    print(f"\n{len(GENERATED)} generated cases over {len(operations)} operations")
