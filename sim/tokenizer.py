"""A deterministic stand-in tokenizer, chat template and text generator.

It only has to be stable and prefix-friendly, not linguistic:

- Text is split GPT-2 style (a word with its leading space, punctuation runs, whitespace);
  each piece's id is a blake2b hash of the piece modulo a 32000-entry vocabulary, offset
  past the special tokens. Roughly one token per word, close enough to real BPE counts.
- Special tokens look like ``<|user|>``; a newline right after one is folded into it. That
  makes every message of the chat template end on a special-token boundary, so the tokens
  of ``[m1..mk] + generation prompt`` are always a strict prefix of the tokens of
  ``[m1..mk, reply, next]`` whatever the message text is (a real chat template has the same
  property, and prefix caching depends on it).
- Generated text is drawn from a fixed list of words with distinct ids, seeded by the
  prompt's tokens, so it is a deterministic function of the prompt and ``max_tokens``, and
  re-tokenizing it gives back exactly the generated ids.

Detokenizing needs the id -> piece table, which is learned as text is tokenized (ids are
hashes). Ids never seen in this process come back as ``<tok_ID>``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from hashlib import blake2b
from typing import Any

from sim.chunks import tokens_hash

VOCAB_SIZE = 32000
SPECIAL_RANGE = 256
# Ids below SPECIAL_RANGE are special tokens; ordinary pieces live above them.
TOTAL_VOCAB = SPECIAL_RANGE + VOCAB_SIZE

BOS = "<|bos|>"
BOS_ID = 1

_FIXED_SPECIALS: dict[str, int] = {
    BOS: BOS_ID,
    "<|end|>": 2,
    "<|end|>\n": 3,
    "<|system|>": 4,
    "<|system|>\n": 5,
    "<|user|>": 6,
    "<|user|>\n": 7,
    "<|assistant|>": 8,
    "<|assistant|>\n": 9,
    "<|tool|>": 10,
    "<|tool|>\n": 11,
}
_FIRST_HASHED_SPECIAL = 16

_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>\n?")
_PIECE_RE = re.compile(r" ?\w+| ?[^\s\w]+|\s+(?!\S)|\s+")

_id_to_piece: dict[int, str] = {}


def _stable_int(text: str) -> int:
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


@lru_cache(maxsize=262144)
def piece_id(piece: str) -> int:
    """Id of one ordinary (non-special) piece."""
    tid = SPECIAL_RANGE + _stable_int(piece) % VOCAB_SIZE
    _id_to_piece.setdefault(tid, piece)
    return tid


@lru_cache(maxsize=4096)
def special_id(token: str) -> int:
    """Id of a special token such as ``<|user|>`` or ``<|user|>\\n``."""
    tid = _FIXED_SPECIALS.get(token)
    if tid is None:
        span = SPECIAL_RANGE - _FIRST_HASHED_SPECIAL
        tid = _FIRST_HASHED_SPECIAL + _stable_int(token) % span
    _id_to_piece.setdefault(tid, token)
    return tid


def split_text(text: str) -> list[str]:
    """Pieces of ``text`` (specials and ordinary pieces); ``"".join`` gives back ``text``."""
    pieces: list[str] = []
    pos = 0
    for m in _SPECIAL_RE.finditer(text):
        pieces.extend(_PIECE_RE.findall(text, pos, m.start()))
        pieces.append(m.group())
        pos = m.end()
    pieces.extend(_PIECE_RE.findall(text, pos))
    return pieces


def _id_of(piece: str) -> int:
    return special_id(piece) if _SPECIAL_RE.fullmatch(piece) else piece_id(piece)


def encode(text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``; ``add_special_tokens`` prepends BOS like a Llama tokenizer."""
    ids = [_id_of(p) for p in split_text(text)]
    if add_special_tokens:
        ids.insert(0, BOS_ID)
    return ids


def encode_with_pieces(text: str, add_special_tokens: bool = False) -> tuple[list[int], list[str]]:
    pieces = split_text(text)
    if add_special_tokens:
        pieces.insert(0, BOS)
    return [_id_of(p) for p in pieces], pieces


def token_str(tid: int) -> str:
    return _id_to_piece.get(tid, f"<tok_{tid}>")


def decode(ids: Iterable[int]) -> str:
    return "".join(token_str(t) for t in ids)


# --- chat template -------------------------------------------------------------------------

_ROLE_CLEAN_RE = re.compile(r"[^a-z_]")


def _role_tag(role: str) -> str:
    # Roles must fit the special-token pattern or the prefix property would break.
    return _ROLE_CLEAN_RE.sub("_", role.lower()) or "user"


def content_text(content: Any) -> str:
    """Text of an OpenAI message ``content``: a string, or parts whose text parts are joined
    with newlines (as vLLM does for string templates); image and other parts are skipped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, str):
            texts.append(part)
    return "\n".join(texts)


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """``<|bos|>`` then ``<|role|>\\n{content}<|end|>\\n`` per message, then
    ``<|assistant|>\\n`` when ``add_generation_prompt``."""
    parts = [BOS]
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        parts.append(f"<|{_role_tag(str(msg.get('role', 'user')))}|>\n")
        parts.append(content_text(msg.get("content")))
        if not (continue_final_message and i == last):
            parts.append("<|end|>\n")
    if add_generation_prompt and not continue_final_message:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    return encode(render_chat(messages, add_generation_prompt, continue_final_message))


# --- generation ----------------------------------------------------------------------------

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def _build_words() -> list[tuple[int, str]]:
    words: list[tuple[int, str]] = []
    used: set[int] = set()
    rng = random.Random(20240601)
    while len(words) < 512:
        word = " " + "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
        tid = piece_id(word)
        # Distinct ids keep decode(generated ids) equal to the generated text.
        if tid not in used and _id_to_piece[tid] == word:
            used.add(tid)
            words.append((tid, word))
    return words


_WORDS = _build_words()


def generate(prompt_tokens: Sequence[int], n: int) -> list[tuple[int, str]]:
    """``n`` (id, piece) pairs, a function of the prompt only, so a longer ``max_tokens``
    extends a shorter answer like greedy decoding would."""
    rng = random.Random(tokens_hash(prompt_tokens))
    return [rng.choice(_WORDS) for _ in range(n)]
