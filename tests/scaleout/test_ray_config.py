"""Specs of flashstep's Ray Serve configuration, without a cluster: the files in deploy/, the
config `flashstep serve --ray` applies, the admin's edits of it, and what crosses between
deployments (errors as data, Serve's backpressure as 429).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
yaml = pytest.importorskip("yaml")  # Ray's own dependency

from ray.serve import Application  # noqa: E402
from ray.serve._private.utils import import_attr  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from flashstep.models import registry  # noqa: E402
from flashstep.models.errors import InvalidRequestError  # noqa: E402
from flashstep.server.errors import QueueFullError  # noqa: E402
from flashstep.server.ray_app import engine_app  # noqa: E402
from flashstep.server.ray_config import (  # noqa: E402
    ADMIN_TOKEN_ENV,
    ENGINE_DEPLOYMENT,
    INGRESS_APP,
    INGRESS_DEPLOYMENT,
    deployment_user_config,
    engine_options,
    find_app,
    model_app_name,
    model_apps,
    serve_config,
    with_app,
    with_deployment_user_config,
    without_app,
)
from flashstep.server.ray_engine import FlashstepEngine  # noqa: E402
from flashstep.server.ray_generation import queue_full, retry_after  # noqa: E402
from flashstep.server.ray_protocol import EngineUserConfig, IngressUserConfig, RemoteError  # noqa: E402
from flashstep.server.ray_serve import merged_config  # noqa: E402
from flashstep.server.serve import build_parser, settings_from_args  # noqa: E402
from flashstep.server.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"


def check_flashstep_config(config: dict) -> ServeDeploySchema:
    """Valid for Serve, builders that import and build, and a consistent flashstep layout."""
    schema = ServeDeploySchema.model_validate(config)
    apps = {app.name: app for app in schema.applications}
    assert INGRESS_APP in apps and apps[INGRESS_APP].route_prefix == "/"
    models = model_apps(config)
    assert models, "no model application"
    for app in schema.applications:
        built = import_attr(app.import_path)(app.args)
        assert isinstance(built, Application), app.name
        for deployment in app.deployments:
            assert deployment.name in (INGRESS_DEPLOYMENT, ENGINE_DEPLOYMENT), (app.name, deployment.name)
    for model, app in models.items():
        assert app["args"]["model"] == model and app["name"] == model_app_name(model)
        assert app["route_prefix"] is None  # only the ingress answers HTTP
        engine = EngineUserConfig.parse(deployment_user_config(app, ENGINE_DEPLOYMENT))
        models_root = app["args"].get("models_root")
        if models_root is None or Path(models_root).is_dir():  # a cluster path may not exist here
            assert registry.resolve(engine.path, models_root, restrict_to_root=True).is_dir()
    ingress = IngressUserConfig.parse(
        deployment_user_config(find_app(config, INGRESS_APP), INGRESS_DEPLOYMENT)
    )
    assert ingress.default_model in models
    return schema


def test_the_serve_config_file_validates_and_its_builders_build():
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = check_flashstep_config(config)
    assert schema.http_options.port == 8000


def test_the_rayservice_manifest_carries_a_valid_serve_config_and_a_cluster():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    spec = manifest["spec"]
    check_flashstep_config(yaml.safe_load(spec["serveConfigV2"]))
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["minReplicas"] <= w["replicas"] <= w["maxReplicas"] for w in workers)
    images = {head["image"], *(w["template"]["spec"]["containers"][0]["image"] for w in workers)}
    assert len(images) == 1, "head and workers must run the same image"
    engine_args = model_apps(yaml.safe_load(spec["serveConfigV2"]))
    gpus = {
        float(w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for w in workers
    }
    assert all(0 < app["args"]["ray_gpus_per_replica"] <= max(gpus) for app in engine_args.values())


def test_the_config_serve_ray_applies_keeps_the_admin_token_out_of_args(tmp_path):
    settings = Settings(models_root=tmp_path, admin_token="s3cret", ray_replicas=2, max_batch_size=4)
    config = serve_config(settings, ["a", "b"], "b", port=8123)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8123
    assert [app.name for app in schema.applications] == [
        INGRESS_APP,
        model_app_name("a"),
        model_app_name("b"),
    ]
    assert all("admin_token" not in (app.args or {}) for app in schema.applications)
    ingress = find_app(config, INGRESS_APP)
    assert ingress["runtime_env"] == {"env_vars": {ADMIN_TOKEN_ENV: "s3cret"}}
    assert model_apps(config)["a"]["args"] == {
        "models_root": str(tmp_path),
        "ray_replicas": 2,
        "max_batch_size": 4,
        "model": "a",
    }
    assert deployment_user_config(ingress, INGRESS_DEPLOYMENT) == {"default_model": "b"}


def test_engine_options_carry_resources_autoscaling_and_queue_limits():
    settings = Settings(
        ray_replicas=2, ray_max_replicas=5, ray_cpus_per_replica=3, ray_gpus_per_replica=0.5, queue_limit=40
    )
    deployment = FlashstepEngine.options(**engine_options(settings, "m"))
    assert deployment.name == ENGINE_DEPLOYMENT
    assert deployment.ray_actor_options == {"num_cpus": 3.0, "num_gpus": 0.5}
    assert deployment.max_queued_requests == 40  # per caller; past it Serve raises BackPressureError
    assert deployment.max_ongoing_requests == 2 * settings.max_batch_size
    assert deployment.user_config == {"path": "m", "revision": 0}
    autoscaling = engine_options(settings, "m")["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["initial_replicas"], autoscaling["max_replicas"]) == (
        2,
        2,
        5,
    )


def test_an_engine_application_without_a_model_is_refused_naming_the_arg():
    with pytest.raises(ValueError, match="`args.model`"):
        engine_app({"max_batch_size": 4})


def test_admin_edits_change_one_application_and_keep_the_rest():
    settings = Settings()
    config = serve_config(settings, ["a", "b"], "a", port=8000)
    a = model_apps(config)["a"]
    swapped = with_app(
        config, with_deployment_user_config(a, ENGINE_DEPLOYMENT, {"path": "a-v2", "revision": 1})
    )
    assert deployment_user_config(model_apps(swapped)["a"], ENGINE_DEPLOYMENT) == {
        "path": "a-v2",
        "revision": 1,
    }
    assert model_apps(swapped)["b"] == model_apps(config)["b"] and model_apps(config)["a"] == a  # copies
    assert list(model_apps(without_app(swapped, model_app_name("a")))) == ["b"]
    added = with_app(config, {**a, "name": model_app_name("c")})
    assert list(model_apps(added)) == ["a", "b", "c"]


def test_serve_ray_keeps_other_applications_of_a_shared_cluster():
    ours = serve_config(Settings(), ["a"], "a", port=8000)
    running = {
        "applications": [{"name": "someone-else", "import_path": "x:y"}, {"name": model_app_name("stale")}],
        "target_capacity": 50,
    }
    merged = merged_config(running, ours)
    assert [app["name"] for app in merged["applications"]] == [
        INGRESS_APP,
        model_app_name("a"),
        "someone-else",
    ]
    assert merged["target_capacity"] == 50


def test_errors_cross_processes_as_data_with_their_field_and_headers():
    with pytest.raises(TypeError):  # why errors are not raised across: this one cannot be unpickled
        pickle.loads(pickle.dumps(InvalidRequestError("steps", "`steps` must be one of [1, 2]")))
    invalid = pickle.loads(
        pickle.dumps(RemoteError.of(InvalidRequestError("steps", "`steps` must be one of [1, 2]")))
    )
    rebuilt = invalid.rebuild()
    assert isinstance(rebuilt, InvalidRequestError) and (rebuilt.field, str(rebuilt)) == (
        "steps",
        "`steps` must be one of [1, 2]",
    )
    full = pickle.loads(pickle.dumps(RemoteError.of(QueueFullError("full", headers={"Retry-After": "3"}))))
    rebuilt = full.rebuild()
    assert isinstance(rebuilt, QueueFullError) and rebuilt.headers == {"Retry-After": "3"}


def test_serve_backpressure_is_a_429_with_retry_after():
    error = queue_full(BackPressureError(num_queued_requests=40, max_queued_requests=40, retry_after_s=2.5))
    assert isinstance(error, QueueFullError) and error.status_code == 429
    assert error.headers == {"Retry-After": "3"}
    assert queue_full(BackPressureError(num_queued_requests=1, max_queued_requests=1)).headers == {
        "Retry-After": "1"
    }
    assert retry_after(0.2) == "1"


def test_user_configs_name_the_field_they_refuse():
    with pytest.raises(ValueError, match=r"`user_config\.path` of the engine deployment"):
        EngineUserConfig.parse({"path": ""})
    with pytest.raises(ValueError, match=r"`user_config\.replicas` of the ingress deployment"):
        IngressUserConfig.parse({"default_model": "a", "replicas": 2})


def test_the_ray_flags_become_settings():
    args = build_parser().parse_args(
        ["--ray", "--replicas", "2", "--max-replicas", "3", "--ray-address", "auto", "--gpus-per-replica", "1"]
    )
    settings = settings_from_args(args)
    assert settings.ray is True
    assert (settings.ray_replicas, settings.ray_max_replicas, settings.ray_address) == (2, 3, "auto")
    assert settings.ray_gpus_per_replica == 1.0
