"""The declared request models of the HTTP API (pydantic, the ``serve`` extra).

The fields of ``POST /v1/generate`` and ``POST /v1/subjects`` are pydantic models built for a server's
:class:`ServeConfig` (ranges and defaults that depend on the server, e.g. ``num_inference_steps`` in
``1..steps_limit``, are the server's). The same models validate every request (unknown fields refused) and
describe the request bodies in ``/openapi.json`` (:func:`request_body`): one form schema for
``multipart/form-data`` and ``application/x-www-form-urlencoded`` (files as binary strings) and one for
``application/json`` (files as ``<name>_base64`` strings).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.serve.config import ServeConfig

__all__ = ["ErrorBody", "GenerateResponse", "RequestModels", "SUBJECT_ID_PATTERN", "request_body", "validate_fields"]

SUBJECT_ID_PATTERN = "^[0-9a-f]{32}$"
SEED_LIMIT = 2**62


class _Fields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class RequestModels:
    """The request models of one server, and the file fields each request takes."""

    generate: type[BaseModel]
    subjects: type[BaseModel]
    generate_files: tuple[str, ...] = ("image",)
    subject_files: tuple[str, ...] = ("delta", "image")

    @classmethod
    def for_config(cls, config: ServeConfig) -> "RequestModels":
        c = config

        class GenerateFields(_Fields):
            """Fields of POST /v1/generate; the reference image is the file ``image`` (multipart) or
            ``image_base64`` (JSON)."""

            prompt: str = Field(description="the prompt, with exactly one {S*} for the subject; at most 77 tokens "
                                f"(also with {{S*}} replaced by class_word) and {c.max_prompt_chars} characters, "
                                "no control characters", examples=["a {S*} wearing sunglasses, oil painting"])
            subject_id: str | None = Field(None, description="id of a subject stored with POST /v1/subjects",
                                           examples=["3f0c" + "0" * 28])
            image_base64: str | None = Field(None, description="the reference image as base64 (JSON bodies; "
                                             f"PNG, JPEG or WebP, at most {c.max_pixels} pixels); required unless "
                                             "the subject has a stored reference")
            class_word: str = Field("person", min_length=1, max_length=64,
                                    description="a plain word for the subject's class (the C~ prompt)")
            negative_prompt: str | None = Field(None, description="replaces the empty prompt in every guidance "
                                                f"term; no {{S*}}, at most 77 tokens and {c.max_prompt_chars} "
                                                "characters")
            num_inference_steps: int | None = Field(c.default_steps, ge=1, le=c.steps_limit,
                                                    description="DDIM steps")
            guidance_scale: float = Field(7.0, ge=0, le=100, description="classifier-free guidance scale")
            reference_guidance_scale: float = Field(5.0, ge=0, le=100,
                                                    description="guidance towards the class-word prompt")
            fusion_steps: int = Field(1, ge=0, le=c.fusion_steps_limit, description="fusion steps per DDIM step")
            fusion_guidance_scale: float = Field(7.0, ge=0, le=100, description="guidance scale of the fusion stage")
            fusion_eta: float = Field(1.0, ge=0, le=1, description="re-noising eta of the fusion stage")
            fusion_embedding_scale: float = Field(0.6, ge=0, le=10, description="scale of S* in the fusion stage")
            seed: int | None = Field(None, ge=0, le=SEED_LIMIT, description="seed of the first image (image j: "
                                     "seed + j); drawn by the server when not given")
            num_images: int = Field(1, ge=1, le=c.max_batch,
                                    description="images of this request (more than one needs ?format=json)")
            reference_mode: Literal["sample", "mean"] = Field(
                "sample", description="reference latent: a posterior draw or its mean (ignored for a stored "
                "reference)")
            timeout_s: float | None = Field(c.timeout_s, gt=0, description="lowers the request's timeout (a "
                                            "larger value is the server's)")

        class SubjectFields(_Fields):
            """Fields of POST /v1/subjects; the files are ``delta`` and/or ``image`` (multipart) or
            ``delta_base64`` / ``image_base64`` (JSON)."""

            name: str | None = Field(None, max_length=100, description="a label, never used as a file name")
            customize: bool = Field(False, description="customize the model on the image in the background "
                                    "(202; poll GET /v1/subjects/{id})")
            customize_steps: int = Field(c.customize_steps, ge=1, le=c.customize_steps_limit,
                                         description="training steps of customize=true")
            reference_mode: Literal["sample", "mean"] = Field(
                "sample", description="how the stored reference encoding is drawn")
            seed: int = Field(0, ge=0, le=SEED_LIMIT, description="seed of the stored reference encoding (and of "
                              "the customization)")

        return cls(GenerateFields, SubjectFields)


def validate_fields(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    """``data`` validated by ``model``; the first problem as :class:`InvalidParameterError` (422)
    ``"<field>: <what is wrong>"`` (``"<field>: unknown field"`` for a field the model does not have)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = first.get("msg", "invalid value")
        kind, ctx = first.get("type"), first.get("ctx") or {}
        if kind == "extra_forbidden":
            message = "unknown field"
        elif kind == "less_than_equal" and "le" in ctx:
            message = f"{first.get('input')} is above this server's limit of {ctx['le']}"
        raise InvalidParameterError(f"{where}: {message}") from None


# -- OpenAPI ------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's class, e.g. PromptError")
    message: str = Field(description="one line")


class ErrorBody(BaseModel):
    """Every error answer."""

    error: ErrorDetail


class GenerateTimings(BaseModel):
    queue_ms: float
    swap_ms: float
    prepare_ms: float
    loop_ms: float
    decode_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    """The JSON answer of POST /v1/generate (``?format=json`` or ``Accept: application/json``)."""

    images: list[str] = Field(description="base64 PNGs")
    media_type: str = "image/png"
    seeds: list[int]
    subject_id: str | None
    batch_size: int = Field(description="images in the runtime batch this request ran in")
    batch_requests: int = Field(description="requests in that batch")
    timings: GenerateTimings


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    schema.pop("title", None)
    return schema


def request_body(model: type[BaseModel], files: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route whose fields are ``model``: the form variants take ``files``
    as binary uploads (instead of the model's ``<file>_base64`` fields), the JSON variant takes the model's
    fields plus ``<file>_base64`` strings. ``required``: files a form must hold."""
    base = _inline(model.model_json_schema())
    form = copy.deepcopy(base)
    as_json = copy.deepcopy(base)
    for name in files:
        form["properties"].pop(f"{name}_base64", None)
        form["properties"][name] = {"type": "string", "format": "binary",
                                    "description": f"the {name} file"}
        as_json["properties"].setdefault(f"{name}_base64", {"type": "string", "contentEncoding": "base64",
                                                            "description": f"the {name} file as base64"})
    if required:
        form["required"] = sorted(set(form.get("required", [])) | set(required))
    form_encoding = {name: {"contentType": "application/octet-stream"} for name in files}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": form, "encoding": form_encoding},
        "application/x-www-form-urlencoded": {"schema": {**form, "properties": {
            k: v for k, v in form["properties"].items() if k not in files}}},
        "application/json": {"schema": as_json},
    }}
