"""CLIP tokenizer of Stable Diffusion 2 and the ``{S*}`` placeholder handling of ProFusion.

The default tokenizer is built fully offline from OpenAI CLIP's BPE vocabulary shipped in
``profusion_rt/data/bpe_simple_vocab_16e6.txt.gz`` (MIT license, see ``LICENSE-CLIP-BPE.txt``). It is the
tokenizer of the OpenCLIP ViT-H/14 text encoder used by Stable Diffusion 2: 49,408 tokens, 48,894 merges,
sequences of 77 ids, padded with ``"!"`` (id 0).

A ProFusion prompt names the customised subject with the placeholder ``{S*}``; for tokenization the
placeholder is replaced by the single token of :data:`PLACEHOLDER_WORD` ("holder", as in the official code),
whose position in the sequence is returned so that its embedding can be swapped for the subject embedding.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from profusion_rt.core.errors import ModelLoadError, PromptError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "BPE_VOCAB_PATH",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MAX_LENGTH",
    "PAD_TOKEN",
    "PLACEHOLDER",
    "PLACEHOLDER_WORD",
    "build_vocab_and_merges",
    "bytes_to_unicode",
    "count_placeholders",
    "load_default_tokenizer",
    "load_tokenizer",
    "replace_placeholder",
    "tokenize_prompt",
]

BPE_VOCAB_PATH = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

#: Length of the text encoder's input (positions of CLIP's text transformer), start and end tokens included.
MAX_LENGTH = 77
#: Padding token of Stable Diffusion 2's tokenizer (id 0); SD 1.x pads with the end token instead.
PAD_TOKEN = "!"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: How a prompt marks the customised subject.
PLACEHOLDER = "{S*}"
#: The word tokenized in place of the placeholder (one token, id 7862 in CLIP's vocabulary).
PLACEHOLDER_WORD = "holder"

# Number of BPE merges CLIP uses (lines 1..48,894 of the file) and the resulting vocabulary size.
_N_MERGES = 49152 - 256 - 2
_VOCAB_SIZE = 2 * 256 + _N_MERGES + 2  # 49,408

# Near misses of the placeholder ("{s*}", "{ S* }", "{S}", "{*}") that are rejected with a hint.
_NEAR_PLACEHOLDER = re.compile(r"\{\s*(?:[sS]\s*\*?|\*)\s*\}")


# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP table from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others map to ``chr(256 + n)`` in byte order. The dict's
    insertion order (printable bytes first) is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    printable_set = set(printable)
    for b in range(256):
        if b not in printable_set:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def build_vocab_and_merges(path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Derive CLIP's vocabulary (token → id) and BPE merges from the gzipped BPE file.

    ``merges`` are lines ``1 : 48,895`` of the decompressed file (line 0 is a header), each split into a pair.
    The vocabulary lists the 256 byte characters, the same with ``</w>`` appended, the concatenation of
    each merge, then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 entries.
    """
    path = Path(path) if path is not None else BPE_VOCAB_PATH
    try:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the CLIP BPE vocabulary {path}: {exc}") from exc

    raw_merges = lines[1 : _N_MERGES + 1]
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(raw_merges, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ModelLoadError(f"malformed BPE merge on line {number} of {path}: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _N_MERGES:
        raise ModelLoadError(f"the CLIP BPE vocabulary {path} has {len(merges)} merges; expected {_N_MERGES}")

    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != _VOCAB_SIZE:  # duplicates would silently shift ids
        raise ModelLoadError(f"the CLIP BPE vocabulary {path} gives {len(vocab)} distinct tokens; expected {_VOCAB_SIZE}")
    return vocab, merges


def _check_tokenizer(tokenizer: CLIPTokenizer, where: str) -> None:
    """Guard against transformers building a placeholder vocabulary silently (it does with wrong arguments)."""
    size = len(tokenizer)
    if size < 1000:
        raise ModelLoadError(f"tokenizer from {where} has only {size} tokens; vocab.json/merges.txt were not loaded")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ModelLoadError(f"tokenizer from {where} has no start or end token")


def _build_default_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges()
    common = dict(
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_LENGTH,
    )
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers >= 5: the tokenizer takes the vocabulary and merges directly (vocab_file/merges_file
        # keywords would be ignored silently).
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **common)
    else:
        # transformers 4.x: the (slow) tokenizer reads vocab.json and merges.txt from a folder.
        with tempfile.TemporaryDirectory(prefix="profusion-clip-tok-") as folder:
            Path(folder, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            Path(folder, "merges.txt").write_text(
                "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
            )
            tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **common)
    _check_tokenizer(tokenizer, str(BPE_VOCAB_PATH))
    if len(tokenizer) != _VOCAB_SIZE or tokenizer.pad_token_id != 0:
        raise ModelLoadError(
            f"default CLIP tokenizer has {len(tokenizer)} tokens and pad id {tokenizer.pad_token_id}; "
            f"expected {_VOCAB_SIZE} and 0"
        )
    logger.debug("built the default CLIP tokenizer (%d tokens, %d merges)", len(tokenizer), len(merges))
    return tokenizer


@functools.lru_cache(maxsize=1)
def load_default_tokenizer() -> CLIPTokenizer:
    """Stable Diffusion 2's CLIP tokenizer, built offline from the bundled BPE vocabulary.

    The instance is cached and shared by all callers: use it, but do not change its attributes or add tokens
    (build your own with ``_build_default_tokenizer`` if you must). :func:`tokenize_prompt` only calls it
    without padding or truncation, so it never changes the backend's state and is safe to share across threads.
    """
    return _build_default_tokenizer()


def _looks_like_sd2(model_root: Path | None, tokenizer_dir: Path) -> bool:
    """Whether a folder belongs to Stable Diffusion 2 (OpenCLIP ViT-H text encoder, width 1024)."""
    candidates: list[Path] = []
    if model_root is not None:
        candidates += [model_root / "text_encoder" / "config.json", model_root / "model_index.json"]
    candidates.append(tokenizer_dir / "tokenizer_config.json")
    for file in candidates:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if file.parent.name == "text_encoder" and (data.get("hidden_size") == 1024 or data.get("projection_dim") == 1024):
            return True
        name = str(data.get("_name_or_path", "")) + " " + str(data.get("name_or_path", ""))
        if re.search(r"stable-diffusion-2", name, re.IGNORECASE):
            return True
    return False


def load_tokenizer(path: str | Path) -> CLIPTokenizer:
    """Load the tokenizer of a model folder (its ``tokenizer/`` subfolder, or a tokenizer folder itself).

    ``model_max_length`` is forced to 77; for a Stable Diffusion 2 folder the pad token is forced to ``"!"``.
    Any failure raises :class:`ModelLoadError` with a one-line message.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelLoadError(f"model folder {root} does not exist")
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a folder; expected a model folder with a tokenizer/ subfolder")

    def has_files(folder: Path) -> bool:
        return (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        )

    if (root / "tokenizer").is_dir():
        tokenizer_dir, model_root = root / "tokenizer", root
    elif has_files(root):
        tokenizer_dir, model_root = root, root.parent  # a tokenizer/ folder given directly: look at its model
    else:
        raise ModelLoadError(f"{root} has no tokenizer/ subfolder (expected vocab.json and merges.txt in {root / 'tokenizer'})")
    if not has_files(tokenizer_dir):
        raise ModelLoadError(f"tokenizer folder {tokenizer_dir} lacks vocab.json and merges.txt (or tokenizer.json)")

    kwargs: dict[str, object] = {"model_max_length": MAX_LENGTH}
    if _looks_like_sd2(model_root, tokenizer_dir):
        kwargs["pad_token"] = PAD_TOKEN
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, JSONDecodeError, ...)
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"cannot load the tokenizer in {tokenizer_dir}: {message}") from exc
    _check_tokenizer(tokenizer, str(tokenizer_dir))
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"tokenizer in {tokenizer_dir} has no padding token")
    logger.debug(
        "loaded tokenizer from %s (%d tokens, pad %r = %d)",
        tokenizer_dir,
        len(tokenizer),
        tokenizer.pad_token,
        tokenizer.pad_token_id,
    )
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def count_placeholders(prompt: str) -> int:
    """How many times ``{S*}`` appears in ``prompt``."""
    return prompt.count(PLACEHOLDER)


def replace_placeholder(prompt: str, word: str) -> str:
    """``prompt`` with ``{S*}`` replaced by ``word`` (e.g. the class word "person" for ProFusion's prompt C~)."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(word, str):
        raise PromptError(f"replacement word must be a string, got {type(word).__name__}")
    return prompt.replace(PLACEHOLDER, word)


def _encode(tokenizer: CLIPTokenizer, text: str) -> list[int]:
    """Ids of ``text`` without start/end tokens, padding or truncation (leaves the tokenizer's state alone)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _placeholder_id(tokenizer: CLIPTokenizer) -> int:
    ids = _encode(tokenizer, PLACEHOLDER_WORD)
    if len(ids) != 1:
        raise ModelLoadError(
            f"the tokenizer splits the placeholder word {PLACEHOLDER_WORD!r} into {len(ids)} tokens; expected one"
        )
    return ids[0]


def tokenize_prompt(
    tokenizer: CLIPTokenizer,
    prompt: str,
    max_length: int = MAX_LENGTH,
    *,
    require_placeholder: bool = False,
) -> tuple[torch.Tensor, int | None]:
    """Tokenize a prompt for the text encoder; locate the placeholder ``{S*}`` if there is one.

    Returns ``(input_ids, placeholder_index)``: ``input_ids`` is a ``torch.long`` tensor of shape
    ``(max_length,)`` — start token, prompt tokens, end token, then the tokenizer's pad id (0 for SD2).
    With ``{S*}`` the text before and after it is tokenized separately and the single token of
    ``"holder"`` is put in between, so the result equals tokenizing the prompt with ``{S*}`` written as
    "holder" (the placeholder is always a word of its own); ``placeholder_index`` is that token's position.
    Without ``{S*}`` the index is ``None`` (or :class:`PromptError` if ``require_placeholder``).

    Raises :class:`PromptError` for more than one placeholder, a misspelt placeholder ("{s*}", "{S}") or a
    prompt longer than ``max_length`` tokens (start and end tokens included).
    """
    import torch

    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 3:
        raise PromptError(f"max_length must be an integer of at least 3, got {max_length!r}")

    count = count_placeholders(prompt)
    if count > 1:
        raise PromptError(f"prompt contains {count} placeholders {PLACEHOLDER}; exactly one is allowed")
    near = _NEAR_PLACEHOLDER.search(prompt.replace(PLACEHOLDER, " "))
    if near:
        raise PromptError(f"prompt contains {near.group(0)!r}; the placeholder is written exactly {PLACEHOLDER}")
    if count == 0 and require_placeholder:
        raise PromptError(
            f"prompt contains no placeholder {PLACEHOLDER}; write it where the subject goes, e.g. 'a photo of {PLACEHOLDER}'"
        )

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    if count == 1:
        before, after = prompt.split(PLACEHOLDER)
        before_ids, after_ids = _encode(tokenizer, before), _encode(tokenizer, after)
        body = before_ids + [_placeholder_id(tokenizer)] + after_ids
        placeholder_index: int | None = 1 + len(before_ids)
    else:
        body = _encode(tokenizer, prompt)
        placeholder_index = None

    length = len(body) + 2
    if length > max_length:
        raise PromptError(
            f"prompt is {length} tokens long; the text encoder accepts at most {max_length} "
            "(including start and end tokens)"
        )
    ids = [bos] + body + [eos] + [pad] * (max_length - length)
    return torch.tensor(ids, dtype=torch.long), placeholder_index


def unpadded_length(tokenizer: CLIPTokenizer, input_ids) -> int:
    """Number of ids of a :func:`tokenize_prompt` result up to and including its end token (the prompt
    without its padding)."""
    return int((input_ids == tokenizer.eos_token_id).nonzero()[0]) + 1
