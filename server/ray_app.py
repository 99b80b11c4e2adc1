"""Serve application builders: what the `import_path`s of a flashstep Serve config point at.

    flashstep.server.ray_app:ingress_app   the `flashstep` application (HTTP + admin)
    flashstep.server.ray_app:engine_app    one `flashstep-model-<name>` application per model

Each takes the config's `args` (Ray's "application builder" pattern): Settings fields, read on
top of the FLASHSTEP_* environment of the process that builds it, so
`args: {models_root: /models, max_batch_size: 8}` means what `--models-root /models
--max-batch-size 8` means to `flashstep serve`. `engine_app` also needs `model`: the name it
serves under (its folder comes from the engine's `user_config.path`, which a swap changes).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from flashstep.server.ray_admin import FlashstepAdmin
from flashstep.server.ray_config import admin_options, engine_options, ingress_options
from flashstep.server.ray_engine import FlashstepEngine
from flashstep.server.ray_ingress import FlashstepIngress
from flashstep.server.settings import Settings


def ingress_app(args: dict[str, Any]) -> Application:
    """The `flashstep` application: the HTTP ingress (route "/") and the admin deployment."""
    settings = Settings(**(args or {}))
    admin = FlashstepAdmin.options(**admin_options()).bind(settings)
    return FlashstepIngress.options(**ingress_options(settings)).bind(settings, admin)


def engine_app(args: dict[str, Any]) -> Application:
    """One model's application: `args.model` names it; the other args are Settings fields."""
    args = dict(args or {})
    model = args.pop("model", None)
    if not isinstance(model, str) or not model:
        raise ValueError(f"`args.model` must name the model this application serves but is {model!r}")
    settings = Settings(**args)
    return FlashstepEngine.options(**engine_options(settings, model)).bind(model, settings)
