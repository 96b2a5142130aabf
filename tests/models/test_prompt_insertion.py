"""S* insertion into the prompt (docs/algorithm.md, "The loop"), on the tiny text encoder,
anchored on transformers' own CLIPTextModel forward."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.models import text as textenc
from profusion_rt.models.tokenizer import tokenize_prompt

PROMPT = "a photo of {S*} on the beach"


@pytest.fixture(scope="module")
def setup(tiny_pipe):
    te, tok = tiny_pipe.text_encoder, tiny_pipe.tokenizer
    ids, p = tokenize_prompt(tok, PROMPT)
    ids = ids[None]
    assert p == 4 and ids[0, p].item() == tok.convert_tokens_to_ids("holder</w>")
    mask = torch.zeros(ids.shape, dtype=torch.float32)
    mask[0, p] = 1.0
    with torch.no_grad():
        embeds = textenc.token_embeddings(te, ids)
    g = torch.Generator().manual_seed(0)
    d = te.config.hidden_size
    s1, s2 = torch.randn(1, 1, d, generator=g), torch.randn(1, 1, d, generator=g)
    return te, ids, p, mask, embeds, s1, s2


def _enc(te, embeds, mask, s, scale, skip):
    with torch.no_grad():
        return textenc.encode_with_placeholder(te, embeds, mask, s, scale, skip)


@pytest.mark.parametrize("skip", [0, 1])
def test_rows_before_placeholder_are_causal(setup, skip):
    te, ids, p, mask, embeds, s1, s2 = setup
    a = _enc(te, embeds, mask, s1, 1.0, skip)
    b = _enc(te, embeds, mask, s2, 1.0, skip)
    with torch.no_grad():
        plain = textenc.encode_plain(te, ids, skip)
    torch.testing.assert_close(a[:, :p], b[:, :p], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[:, :p], plain[:, :p], atol=1e-6, rtol=0)
    # the placeholder row and every later row do depend on S*
    diff = (a - b).abs().amax(-1)[0]
    assert (diff[p:] > 1e-4).all()


@pytest.mark.parametrize("skip", [0, 1])
def test_only_placeholder_row_is_scaled(setup, skip):
    te, ids, p, mask, embeds, s1, _ = setup
    full = _enc(te, embeds, mask, s1, 1.0, skip)
    scaled = _enc(te, embeds, mask, s1, 0.6, skip)
    others = torch.ones(full.shape[1], dtype=torch.bool)
    others[p] = False
    assert torch.equal(full[:, others], scaled[:, others])
    torch.testing.assert_close(scaled[:, p], 0.6 * full[:, p], atol=1e-6, rtol=1e-6)
    assert full[:, p].abs().max() > 0.1


@pytest.mark.parametrize("skip", [0, 1])
def test_original_embedding_row_gives_plain_encoding(setup, skip):
    te, ids, p, mask, embeds, _, _ = setup
    s_orig = embeds[:, p : p + 1].clone()  # token + position embedding of "holder" at p
    out = _enc(te, embeds, mask, s_orig, 1.0, skip)
    with torch.no_grad():
        plain = textenc.encode_plain(te, ids, skip)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)
    # S* replaces the whole row: the bare token embedding (no position term) gives something else
    with torch.no_grad():
        bare = te.embeddings.token_embedding(ids[:, p : p + 1])
    assert (_enc(te, embeds, mask, bare, 1.0, skip) - plain)[:, p].abs().max() > 1e-3


def test_encode_plain_matches_transformers(setup, tiny_pipe):
    te, ids, *_ = setup
    other, _ = tokenize_prompt(tiny_pipe.tokenizer, "an oil painting of a cat")
    batch = torch.cat([ids, other[None]])
    with torch.no_grad():
        ref = te(input_ids=batch, output_hidden_states=True)
        skip0 = textenc.encode_plain(te, batch, 0)
        skip1 = textenc.encode_plain(te, batch, 1)
        layers = te.config.num_hidden_layers
        assert len(ref.hidden_states) == layers + 1  # embeddings + one per layer
        penultimate = te.final_layer_norm(ref.hidden_states[-2])
    torch.testing.assert_close(skip0, ref.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(skip1, penultimate, atol=1e-5, rtol=0)
    assert (skip0 - skip1).abs().max() > 1e-3
