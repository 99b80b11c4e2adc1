"""Schemathesis against the live server's own OpenAPI document: no 5xx, no undocumented status.

Every operation is exercised with bounded, derandomized examples, both ones the schema allows and
ones it forbids (wrong types, missing fields, odd path parameters). The admin routes are called without a token, so they answer 401 and the
shared server's models are never unloaded by the fuzzer.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 12


def test_every_operation_answers_without_5xx_and_only_with_documented_statuses(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    failures: dict[str, str] = {}
    for operation, mode in ((op, mode) for op in operations for mode in GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def exercise(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

        try:
            exercise()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE, operation.label  # nothing to get wrong in a bare GET
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - run every operation, report all failures
            failures[f"{operation.label} ({mode.value})"] = str(exc)[:1500]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
