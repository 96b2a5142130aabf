"""``/openapi.json`` declares the request fields (names, types, defaults, ranges: the served limits) of
``POST /v1/generate`` and ``POST /v1/subjects`` and the path parameter of ``/v1/subjects/{subject_id}``;
``/docs`` is served. The declared models are the ones that validate the requests."""

from __future__ import annotations

import pytest

GENERATE_FIELDS = {"prompt", "subject_id", "class_word", "negative_prompt", "num_inference_steps", "guidance_scale",
                   "reference_guidance_scale", "fusion_steps", "fusion_guidance_scale", "fusion_eta",
                   "fusion_embedding_scale", "seed", "num_images", "reference_mode", "timeout_s"}


@pytest.fixture(scope="module")
def openapi(server):
    import httpx

    response = httpx.get(server.url + "/openapi.json", timeout=60)
    assert response.status_code == 200
    return response.json()


def _type(prop: dict) -> tuple[str | None, dict]:
    """(JSON type, the branch that carries the constraints) of a property, looking through ``X | None``."""
    if "anyOf" in prop:
        branch = next(b for b in prop["anyOf"] if b.get("type") != "null")
        return branch.get("type"), branch
    return prop.get("type"), prop


def test_generate_fields_types_defaults_and_ranges(openapi, serve_config):
    content = openapi["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/x-www-form-urlencoded", "application/json"}
    form = content["multipart/form-data"]["schema"]
    assert set(form["properties"]) == GENERATE_FIELDS | {"image"}
    assert form["required"] == ["prompt"]
    assert form["additionalProperties"] is False  # unknown fields are refused
    assert form["properties"]["image"] == {"type": "string", "format": "binary", "description": "the image file"}
    assert set(content["application/json"]["schema"]["properties"]) == GENERATE_FIELDS | {"image_base64"}
    props = form["properties"]
    expected = {  # name: (type, default, minimum, maximum); ranges that depend on the server are its own
        "num_inference_steps": ("integer", serve_config.default_steps, 1, serve_config.steps_limit),
        "guidance_scale": ("number", 7.0, 0, 100),
        "reference_guidance_scale": ("number", 5.0, 0, 100),
        "fusion_steps": ("integer", 1, 0, serve_config.fusion_steps_limit),
        "fusion_guidance_scale": ("number", 7.0, 0, 100),
        "fusion_eta": ("number", 1.0, 0, 1),
        "fusion_embedding_scale": ("number", 0.6, 0, 10),
        "seed": ("integer", None, 0, 2**62),
        "num_images": ("integer", 1, 1, serve_config.max_batch),
        "timeout_s": ("number", serve_config.timeout_s, None, None),
    }
    for name, (kind, default, low, high) in expected.items():
        got_kind, branch = _type(props[name])
        assert got_kind == kind, name
        assert props[name].get("default") == default, name
        assert branch.get("minimum") == low, name
        assert branch.get("maximum") == high, name
        assert props[name].get("description"), name
    assert _type(props["timeout_s"])[1]["exclusiveMinimum"] == 0
    assert props["reference_mode"]["enum"] == ["sample", "mean"] and props["reference_mode"]["default"] == "sample"
    assert props["class_word"]["default"] == "person" and props["class_word"]["maxLength"] == 64
    assert _type(props["prompt"])[0] == "string" and "{S*}" in props["prompt"]["description"]
    params = {p["name"]: p for p in openapi["paths"]["/v1/generate"]["post"]["parameters"]}
    assert params["format"]["in"] == "query"
    answers = openapi["paths"]["/v1/generate"]["post"]["responses"]
    assert "image/png" in answers["200"]["content"] and "application/json" in answers["200"]["content"]
    assert {"413", "415", "422", "429", "504"} <= set(answers)


def test_subject_fields_and_path_parameter(openapi, serve_config):
    form = openapi["paths"]["/v1/subjects"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"name", "customize", "customize_steps", "reference_mode", "seed", "delta",
                                       "image"}
    props = form["properties"]
    assert props["customize"]["type"] == "boolean" and props["customize"]["default"] is False
    steps = props["customize_steps"]
    assert (steps["default"], steps["minimum"], steps["maximum"]) == (
        serve_config.customize_steps, 1, serve_config.customize_steps_limit)
    assert props["delta"]["format"] == "binary" and props["image"]["format"] == "binary"
    json_body = openapi["paths"]["/v1/subjects"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"delta_base64", "image_base64"} <= set(json_body["properties"])
    for method in ("get", "delete"):
        params = openapi["paths"]["/v1/subjects/{subject_id}"][method]["parameters"]
        assert [(p["name"], p["in"], p["required"]) for p in params] == [("subject_id", "path", True)]
        assert params[0]["schema"]["type"] == "string" and params[0]["schema"]["pattern"] == "^[0-9a-f]{32}$"


def test_docs_page_is_served(client):
    response = client.get("/docs")
    assert response.status_code == 200 and "swagger" in response.text.lower()


def test_declared_models_validate_the_requests(server):
    """The schema and the validation come from one model: every declared generate field is accepted by
    the validator, and a value outside a declared range is refused."""
    from profusion_rt.core.errors import InvalidParameterError
    from profusion_rt.serve.schemas import validate_fields

    models = server.state.models
    ok = validate_fields(models.generate, {"prompt": "a {S*}", "num_inference_steps": "2", "seed": "3"})
    assert ok.num_inference_steps == 2 and ok.seed == 3 and ok.guidance_scale == 7.0
    limit = server.state.config.steps_limit
    with pytest.raises(InvalidParameterError, match=f"num_inference_steps: {limit + 1} is above this server's limit"):
        validate_fields(models.generate, {"prompt": "a {S*}", "num_inference_steps": str(limit + 1)})
    with pytest.raises(InvalidParameterError, match="steps: unknown field"):
        validate_fields(models.generate, {"prompt": "a {S*}", "steps": "2"})
