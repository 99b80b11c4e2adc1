"""The layering rules of docs/architecture.md, checked on the source's import graph."""

from __future__ import annotations

from tests.architecture.import_graph import cycles, import_graph

GRAPH = import_graph()


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_the_graph_covers_every_package():
    assert {layer(m) for m in GRAPH} >= {"server", "models", "kernels", "training", "bench", "cli"}


def test_no_import_cycle_anywhere_in_the_project():
    assert cycles(GRAPH) == []


def test_models_knows_nothing_of_http_and_training_never_reaches_into_the_server():
    for module, imported in GRAPH.items():
        if layer(module) in {"models", "kernels", "training"}:
            assert not {m for m in imported if layer(m) == "server"}, module
        if layer(module) in {"models", "kernels"}:
            assert not {m for m in imported if layer(m) in {"training", "bench", "cli"}}, module


def test_no_recipe_imports_another_recipe():
    recipes = {m for m in GRAPH if m.startswith("flashstep.training.recipes.")}
    assert recipes, "training/recipes/ holds the recipes"
    for module in recipes:
        assert not (GRAPH[module] & recipes), (module, GRAPH[module] & recipes)
