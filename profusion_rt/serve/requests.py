"""Reading one HTTP request: the body (multipart, url-encoded or JSON) within a byte limit, uploads, the
reference image, the prompt rules; writing the PNG answer.

The handlers read the raw request here (not through FastAPI's body parameters) so that the byte limit
holds while the body streams in, a chunked upload is cut off at the limit, and the same fields arrive as
multipart, url-encoded or JSON; the fields are then validated by the declared models of
:mod:`profusion_rt.serve.schemas`, which also describe the bodies in ``/openapi.json``.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from profusion_rt.core.errors import ImageError, InvalidParameterError, PromptError
from profusion_rt.core.image_io import load_image, png_info
from profusion_rt.models.tokenizer import (
    PLACEHOLDER,
    replace_placeholder,
    tokenize_prompt,
)
from profusion_rt.pipeline import tokenize_negative_prompt
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import (
    BadRequestError,
    ClientGone,
    PayloadTooLargeError,
    UnsupportedMediaError,
)
from profusion_rt.serve.schemas import validate_fields

__all__ = ["CONTROL_RE", "check_prompt", "close_uploads", "copy_upload", "decode_image", "png_bytes", "read_request",
           "upload_bytes"]

CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class _BodyTooLarge(Exception):
    pass


def _limited(request, limit: int):
    """A copy of ``request`` whose body reads raise :class:`_BodyTooLarge` beyond ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadRequestError("the Content-Length header is not a number") from None
        if declared > limit:
            raise PayloadTooLargeError(f"the request body is {declared} bytes; the limit is {limit}")
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return Request(request.scope, receive)


async def read_request(request, limit: int, files: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields, uploads)`` of a multipart, url-encoded or JSON body of at most ``limit`` bytes. ``uploads`` maps the
    allowed file field names to ``UploadFile`` objects (multipart) or decoded bytes (``<name>_base64`` JSON
    fields); the caller closes upload files via :func:`close_uploads`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = _limited(request, limit)
    try:
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await limited.form(max_files=len(files), max_fields=64, max_part_size=64 * 1024)
            fields: dict[str, Any] = {}
            uploads: dict[str, Any] = {}
            try:
                for key, value in form.multi_items():
                    if key in fields or key in uploads:
                        raise InvalidParameterError(f"{key}: given more than once")
                    if isinstance(value, UploadFile):
                        if key not in files:
                            raise InvalidParameterError(f"{key}: unexpected file upload")
                        uploads[key] = value
                    elif key in files:
                        raise InvalidParameterError(f"{key}: must be a file upload")
                    else:
                        fields[key] = value
            except BaseException:
                await form.close()
                raise
            return fields, uploads
        if content_type == "application/json":
            body = await limited.body()
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise BadRequestError(f"the body is not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise BadRequestError("the JSON body must be an object")
            uploads = {}
            for name in files:
                encoded = data.pop(f"{name}_base64", None)
                if encoded is not None:
                    if not isinstance(encoded, str):
                        raise InvalidParameterError(f"{name}_base64: must be a base64 string")
                    try:
                        uploads[name] = base64.b64decode(encoded, validate=True)
                    except ValueError:
                        raise BadRequestError(f"{name}_base64 is not valid base64") from None
            return data, uploads
    except _BodyTooLarge:
        raise PayloadTooLargeError(f"the request body is over the limit of {limit} bytes") from None
    except HTTPException as exc:  # malformed multipart
        raise BadRequestError(f"malformed multipart body: {exc.detail}") from None
    except ClientDisconnect:
        raise ClientGone() from None
    raise UnsupportedMediaError("send multipart/form-data, application/x-www-form-urlencoded or application/json, "
                                f"not {content_type or 'a body without Content-Type'}")


async def read_generate_request(request, config: ServeConfig, models):
    """The body of ``POST /v1/generate`` read within the byte limit and checked against ``models.generate``
    -> (fields, image bytes or None, whether the answer is JSON); several images need the JSON answer."""
    data, uploads = await read_request(request, config.max_upload_bytes, models.generate_files)
    try:
        p = validate_fields(models.generate, data)  # types, ranges, the server's limits, unknown fields
        image = await upload_bytes(uploads["image"], config.max_upload_bytes, "image") if "image" in uploads else None
    finally:
        await close_uploads(uploads)
    want_json = request.query_params.get("format") == "json" or \
        "application/json" in request.headers.get("accept", "")
    if p.num_images > 1 and not want_json:
        raise InvalidParameterError("num_images: a PNG answer holds one image; ask for ?format=json")
    return p, image, want_json


def validate_subject_fields(models, data: dict[str, Any], uploads: dict[str, Any], config: ServeConfig):
    """The fields of ``POST /v1/subjects`` checked against ``models.subjects`` and the rules between them (a
    delta and/or an image; customization needs an image, no delta, and a server that customizes)."""
    p = validate_fields(models.subjects, data)
    if "delta" not in uploads and "image" not in uploads:
        raise InvalidParameterError("give a delta file ('delta'), a reference image ('image'), or both")
    if p.name is not None and CONTROL_RE.search(p.name):
        raise InvalidParameterError("name: contains control characters")
    if p.customize:
        if not config.allow_customize:
            raise InvalidParameterError("customize: this server does not customize (started with --no-customize)")
        if "image" not in uploads or "delta" in uploads:
            raise InvalidParameterError("customize: give a reference image and no delta")
    if "customize_steps" in p.model_fields_set and not p.customize:
        raise InvalidParameterError("customize_steps: only with customize=true")
    return p


async def close_uploads(uploads: dict[str, Any]) -> None:
    for value in uploads.values():
        close = getattr(value, "close", None)
        if close is not None:
            await close()


async def upload_bytes(value, limit: int, name: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        data = await value.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the {name} upload is over the limit of {limit} bytes")
    return data


def decode_image(data: bytes, config: ServeConfig):
    """An uploaded reference image as an RGB PIL image: 415 if it is not one of the accepted formats, 413
    above ``max_pixels``, 400 if it is damaged."""
    if not data:
        raise ImageError("the image upload is empty (0 bytes)")
    accepted = ", ".join(config.image_formats)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, (width, height) = probe.format, probe.size
    except UnidentifiedImageError:
        raise UnsupportedMediaError(f"the upload is not an image in an accepted format ({accepted})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"the image is too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a damaged upload
        raise ImageError(f"the image cannot be read ({type(exc).__name__}: {exc})") from None
    if fmt not in config.image_formats:
        raise UnsupportedMediaError(f"image format {fmt} is not accepted; send {accepted}")
    if width * height > config.max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {config.max_pixels}")
    return load_image(data, max_pixels=config.max_pixels)


def check_prompt(tokenizer, prompt: str, class_word: str, max_chars: int, negative_prompt: str | None = None) -> None:
    """The prompt rules of the server (:class:`PromptError`, 422): one ``{S*}``, at most 77 tokens (the class
    prompt too), no control characters, at most ``max_chars`` characters; a negative prompt: no ``{S*}``, at
    most 77 tokens and ``max_chars`` characters, no control characters."""
    if negative_prompt is not None:
        if len(negative_prompt) > max_chars:
            raise PromptError(f"the negative_prompt is {len(negative_prompt)} characters long; the limit is {max_chars}")
        if CONTROL_RE.search(negative_prompt):
            raise PromptError("the negative_prompt contains control characters")
        tokenize_negative_prompt(tokenizer, negative_prompt)

    if not prompt.strip():
        raise PromptError("the prompt is empty")
    if len(prompt) > max_chars:
        raise PromptError(f"the prompt is {len(prompt)} characters long; the limit is {max_chars}")
    for text, what in ((prompt, "prompt"), (class_word, "class_word")):
        if CONTROL_RE.search(text):
            raise PromptError(f"the {what} contains control characters")
    if not class_word.strip() or any(c in class_word for c in "{}"):
        raise PromptError(f"class_word must be a plain word such as 'person', got {class_word!r}")
    tokenize_prompt(tokenizer, prompt, require_placeholder=True)
    try:
        tokenize_prompt(tokenizer, replace_placeholder(prompt, class_word))
    except PromptError as exc:
        raise PromptError(f"with {PLACEHOLDER} replaced by the class word: {exc}") from None


def png_bytes(image, metadata: dict[str, str] | None = None) -> bytes:
    """A PIL image as PNG bytes with ``metadata`` as text chunks."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


async def copy_upload(upload, target: Path, limit: int) -> None:
    """Copy an upload (an ``UploadFile`` or bytes) into the server-named ``target`` (in a subject's staging
    folder, which is fsynced and renamed into place as a whole), at most ``limit`` bytes."""
    written = 0
    with open(target, "wb") as fh:
        while True:
            if isinstance(upload, (bytes, bytearray)):
                chunk, upload = bytes(upload), b""
            else:
                chunk = await upload.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                raise PayloadTooLargeError(f"the delta upload is over the limit of {limit} bytes")
            fh.write(chunk)

