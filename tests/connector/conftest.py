"""Fixtures of the connector tests; the model itself comes from tests/conftest.py."""

from __future__ import annotations

import pytest

from lynxkv.connector.model import LoadedModel


@pytest.fixture(scope="session")
def sample_ids(smollm: LoadedModel) -> list[int]:
    """A short real prompt, chat-formatted: about 60 tokens."""
    messages = [{"role": "user", "content": "Name three rivers of Europe and their lengths."}]
    tok = smollm.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False).input_ids)
