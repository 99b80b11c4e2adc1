"""The engine contract: the real engine and the server tests' fake both implement `EngineProtocol`.

`runtime_checkable` only checks that members exist; the signature comparison below also fails
when a method gains, loses or renames a parameter on one side of the contract.
"""

from __future__ import annotations

import inspect
import typing

import pytest

from flashstep.models.contract import EngineProtocol
from flashstep.models.engine import Engine
from tests.server.fakes import FakeEngine

METHODS = ("validate", "batch_key", "generate", "warmup", "memory_bytes", "count_tokens", "close")


def parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def contract_mismatches(cls: type) -> list[str]:
    """What `cls` lacks or declares differently from `EngineProtocol` (empty: it implements it)."""
    problems = []
    for name in METHODS:
        method = getattr(cls, name, None)
        if not callable(method):
            problems.append(f"{cls.__name__}.{name} is missing")
        elif parameters(method) != parameters(getattr(EngineProtocol, name)):
            problems.append(f"{cls.__name__}.{name}{inspect.signature(method)} != {inspect.signature(getattr(EngineProtocol, name))}")
    return problems


def test_the_contract_lists_exactly_what_the_server_uses():
    members = set(typing.get_type_hints(EngineProtocol)) | {n for n in vars(EngineProtocol) if n in METHODS}
    assert members == {"name", "path", "version", "family", "config", "device", "dtype", *METHODS}


@pytest.mark.parametrize("cls", [Engine, FakeEngine], ids=lambda c: c.__name__)
def test_engine_classes_declare_every_method_of_the_contract(cls):
    assert contract_mismatches(cls) == []


def test_the_real_engine_declares_every_attribute_of_the_contract():
    declared = typing.get_type_hints(Engine)
    assert set(typing.get_type_hints(EngineProtocol)) <= set(declared)


def test_a_fake_engine_satisfies_the_contract_at_run_time():
    assert isinstance(FakeEngine("m"), EngineProtocol)


def test_the_contract_check_catches_a_wrong_signature():
    class Broken(FakeEngine):
        def generate(self, requests, extra):  # one parameter too many
            return super().generate(requests)

    (problem,) = contract_mismatches(Broken)
    assert problem.startswith("Broken.generate(self, requests, extra) != (self, requests")
    assert not isinstance(object(), EngineProtocol)
