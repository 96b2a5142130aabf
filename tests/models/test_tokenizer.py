"""Tests of the offline CLIP tokenizer and the {S*} placeholder handling."""

from __future__ import annotations

import json

import pytest
import torch

from profusion_rt.core.errors import ModelLoadError, PromptError
from profusion_rt.models.tokenizer import (
    PLACEHOLDER,
    PLACEHOLDER_WORD,
    build_vocab_and_merges,
    load_default_tokenizer,
    load_tokenizer,
    replace_placeholder,
    tokenize_prompt,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


def test_vocab_and_merges_sizes():
    vocab, merges = build_vocab_and_merges()
    assert len(vocab) == 49408
    assert len(merges) == 48894
    assert all(len(pair) == 2 for pair in merges)
    assert vocab["!"] == 0
    assert vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407
    assert vocab["".join(merges[0])] == 512


def test_default_tokenizer_special_tokens(tok):
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    assert tok.bos_token_id == 49406
    assert tok.eos_token_id == 49407
    assert tok.unk_token_id == 49407
    assert load_default_tokenizer() is tok  # cached


def test_known_ids(tok):
    assert tok("a photo of a cat").input_ids == CAT_IDS
    ids, index = tokenize_prompt(tok, "a photo of a cat")
    assert index is None
    assert ids.dtype == torch.long and ids.shape == (77,)
    assert ids[:7].tolist() == CAT_IDS
    assert ids[7:].tolist() == [0] * 70


def test_padding_max_length_pads_with_zero(tok):
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == CAT_IDS and set(ids[7:]) == {0}


@pytest.mark.parametrize(
    "prompt",
    ["a photo of a cat", "", "An oil painting, in the style of Van Gogh!", "don't   stop\nbelieving 1234"],
)
def test_plain_prompt_matches_tokenizer(tok, prompt):
    expected = tok(prompt, padding="max_length", max_length=77).input_ids
    ids, index = tokenize_prompt(tok, prompt)
    assert index is None
    assert ids.tolist() == expected


def test_placeholder_word_is_one_token(tok):
    assert PLACEHOLDER == "{S*}"
    assert len(tok(PLACEHOLDER_WORD, add_special_tokens=False).input_ids) == 1


def test_placeholder_equivalence_and_index(tok):
    ids, index = tokenize_prompt(tok, "a {S*} wearing sunglasses")
    direct = tok("a holder wearing sunglasses", padding="max_length", max_length=77).input_ids
    assert ids.tolist() == direct
    assert index == 2
    assert ids[index].item() == tok.convert_tokens_to_ids("holder</w>")


@pytest.mark.parametrize(
    ("prompt", "index"),
    [
        ("{S*}, wearing sunglasses", 1),
        ("a photo of {S*}.", 4),
        ("{S*}'s portrait, oil painting", 1),
        ("{S*}", 1),
        ("a portrait of ({S*}) smiling", 5),
        ("a {S*}2 photo", 2),
    ],
)
def test_placeholder_with_punctuation(tok, prompt, index):
    ids, got = tokenize_prompt(tok, prompt)
    direct = tok(prompt.replace(PLACEHOLDER, PLACEHOLDER_WORD), padding="max_length", max_length=77).input_ids
    assert ids.tolist() == direct
    assert got == index
    assert ids[got].item() == tok.convert_tokens_to_ids("holder</w>")


def test_two_placeholders_rejected(tok):
    with pytest.raises(PromptError, match=r"prompt contains 2 placeholders \{S\*\}; exactly one is allowed"):
        tokenize_prompt(tok, "{S*} and {S*}")


def test_missing_placeholder_when_required(tok):
    with pytest.raises(PromptError, match="no placeholder"):
        tokenize_prompt(tok, "a photo of a cat", require_placeholder=True)


def test_misspelt_placeholder_rejected(tok):
    with pytest.raises(PromptError, match=r"\{S\*\}"):
        tokenize_prompt(tok, "a photo of {s*}")


def test_too_long_prompt(tok):
    prompt = " ".join(["cat"] * 80)
    with pytest.raises(PromptError) as info:
        tokenize_prompt(tok, prompt)
    message = str(info.value)
    assert "prompt is 82 tokens long" in message
    assert "at most 77 (including start and end tokens)" in message
    with pytest.raises(PromptError, match="prompt is 79 tokens long"):
        tokenize_prompt(tok, "{S*} " + " ".join(["cat"] * 76))


def test_exactly_77_tokens_fits(tok):
    ids, index = tokenize_prompt(tok, "{S*} " + " ".join(["cat"] * 74))
    assert index == 1
    assert ids[-1].item() == 49407 and 0 not in ids.tolist()


def test_replace_placeholder():
    assert replace_placeholder("a photo of {S*} at the beach", "person") == "a photo of person at the beach"
    assert replace_placeholder("no placeholder", "person") == "no placeholder"


def test_load_tokenizer_round_trip(tmp_path, tok):
    model = tmp_path / "model"
    tok.save_pretrained(str(model / "tokenizer"))
    (model / "text_encoder").mkdir()
    (model / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024}))
    loaded = load_tokenizer(model)
    assert loaded.model_max_length == 77
    assert loaded.pad_token_id == 0
    assert loaded("a photo of a cat").input_ids == CAT_IDS


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty" / "tokenizer").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="lacks vocab.json"):
        load_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken" / "tokenizer"
    broken.mkdir(parents=True)
    (broken / "vocab.json").write_text("{not json")
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(tmp_path / "broken")
    assert "\n" not in str(info.value)
