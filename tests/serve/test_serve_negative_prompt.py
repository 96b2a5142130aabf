"""The server's ``negative_prompt`` field: the image equals the in-process runtime's for the same request,
differs from the one without it, and a bad negative prompt is a 422 with one line."""

from __future__ import annotations

import pytest
from serve_helpers import expected_array, generate_fields, png_array

NEGATIVE = "blurry, low quality"


def test_negative_prompt_matches_the_runtime(client, reference_png, ref_runtime):
    files = {"image": ("face.png", reference_png, "image/png")}
    response = client.post("/v1/generate", files=files, data=generate_fields(seed=9, negative_prompt=NEGATIVE))
    assert response.status_code == 200, response.text
    got = png_array(response.content)
    want = expected_array(ref_runtime, reference_png, prompt="a {S*} wearing sunglasses", seed=9,
                          negative_prompt=NEGATIVE)
    assert (got == want).all()
    without = expected_array(ref_runtime, reference_png, prompt="a {S*} wearing sunglasses", seed=9)
    assert not (got == without).all()


@pytest.mark.parametrize("negative, match", [
    ("very " * 80, "negative_prompt: prompt is 82 tokens long"),
    ("a {S*}", "negative_prompt"),
    ("bad\x00", "control characters"),
])
def test_bad_negative_prompts_are_422(client, reference_png, negative, match):
    files = {"image": ("face.png", reference_png, "image/png")}
    response = client.post("/v1/generate", files=files, data=generate_fields(negative_prompt=negative))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "PromptError" and match in error["message"] and "\n" not in error["message"]
