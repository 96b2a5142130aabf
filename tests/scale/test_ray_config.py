"""``profusion-rt serve --engine ray`` options and ``--print-config`` (no cluster needed)."""

from __future__ import annotations

import pytest

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.serve import ServeConfig
from profusion_rt.serve.ray.spec import APP_BUILDER, ModelSpec, ScaleSpec, serve_config


def _parse(*argv):
    import argparse

    from profusion_rt.serve.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_scale_spec_checks():
    for bad in (dict(replicas=0), dict(replicas=None), dict(replicas=2, min_replicas=1, max_replicas=3),
                dict(replicas=None, min_replicas=3, max_replicas=2), dict(target_ongoing_requests=0),
                dict(subjects_per_replica=0), dict(num_gpus=-1)):
        with pytest.raises(InvalidParameterError):
            ScaleSpec(**bad)


def test_serve_config_fixed_and_autoscaled():
    config = ServeConfig(max_batch=4, max_queue=16)
    fixed = serve_config(ModelSpec(), ScaleSpec(replicas=3, num_gpus=1), config, "/data")
    app = fixed["applications"][0]
    assert app["import_path"] == APP_BUILDER and app["args"]["data"] == "/data"
    gen = {d["name"]: d for d in app["deployments"]}["Generator"]
    assert gen["num_replicas"] == 3 and gen["ray_actor_options"]["num_gpus"] == 1
    assert gen["max_ongoing_requests"] == 8 and gen["max_queued_requests"] == 16 and "autoscaling_config" not in gen
    auto = serve_config(ModelSpec(), ScaleSpec(replicas=None, min_replicas=0, max_replicas=4,
                                               target_ongoing_requests=3), config, "s3://b/p")
    gen = {d["name"]: d for d in auto["applications"][0]["deployments"]}["Generator"]
    assert "num_replicas" not in gen
    assert gen["autoscaling_config"]["min_replicas"] == 0 and gen["autoscaling_config"]["max_replicas"] == 4
    assert gen["autoscaling_config"]["target_ongoing_requests"] == 3


def test_print_config_is_yaml_for_serve_deploy(capsys, tmp_path):
    yaml = pytest.importorskip("yaml")
    from profusion_rt.serve.cli import cmd_serve

    args = _parse("--engine", "ray", "--print-config", "--min-replicas", "1", "--max-replicas", "3",
                  "--subjects-per-replica", "5", "--data", str(tmp_path / "d"), "--host", "0.0.0.0")
    assert cmd_serve(args) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app = doc["applications"][0]
    assert app["args"]["scale"]["subjects_per_replica"] == 5
    assert app["args"]["data"] == str((tmp_path / "d").resolve())  # absolute: replicas run elsewhere


def test_cli_refusals():
    from profusion_rt.serve.cli import cmd_serve

    with pytest.raises(InvalidParameterError):
        cmd_serve(_parse("--print-config"))  # only with --engine ray
    with pytest.raises(InvalidParameterError):
        cmd_serve(_parse("--engine", "ray", "--print-config", "--replicas", "2", "--min-replicas", "1"))
