import hashlib
import os
import re
import subprocess
import sys

import pytest

from lynxkv.connector.model import LoadedModel
from lynxkv.connector.texts import Document, approx_tokens, make_document


def test_the_same_seed_gives_the_same_document() -> None:
    assert make_document(7, 800) == make_document(7, 800)
    assert make_document(7, 800).text != make_document(8, 800).text


def test_documents_are_the_same_in_another_process() -> None:
    code = (
        "import hashlib\n"
        "from lynxkv.connector.texts import make_document\n"
        "d = make_document(3, 1500)\n"
        "print(hashlib.sha256((d.text + d.question + d.answer).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    d = make_document(3, 1500)
    assert (
        out.stdout.strip() == hashlib.sha256((d.text + d.question + d.answer).encode()).hexdigest()
    )


@pytest.mark.parametrize("tokens", [1, 100, 1000, 4000, 16000])
def test_documents_reach_the_requested_length(tokens: int) -> None:
    doc = make_document(tokens, tokens)
    assert tokens <= approx_tokens(doc.text) <= tokens + 400  # at most one section over


def test_a_custom_counter_sets_the_floor() -> None:
    def words(s: str) -> int:
        return len(s.split())

    doc = make_document(1, 700, words)
    assert words(doc.text) >= 700


@pytest.mark.parametrize("seed", range(20))
def test_the_needle_is_the_only_place_that_answers(seed: int) -> None:
    doc = make_document(seed, 2000)
    assert re.fullmatch(r"\d{4}-[A-Z]{2}", doc.answer)
    assert doc.text.count(doc.answer) == 1
    assert doc.text.count("door code") == 1
    town = re.fullmatch(
        r"What is the door code of the records room at the (.+) depot\?", doc.question
    )
    assert town is not None
    assert f"the {town[1]} depot is {doc.answer}" in doc.text


def test_the_prompt_holds_the_report_and_the_question() -> None:
    doc = make_document(5, 300)
    prompt = doc.prompt()
    assert prompt.startswith(doc.text)
    assert prompt.endswith(doc.question)


def test_a_nonpositive_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_document(0, 0)


@pytest.mark.model
@pytest.mark.parametrize("tokens", [1024, 4096])
def test_documents_reach_the_length_in_model_tokens(smollm: LoadedModel, tokens: int) -> None:
    tok = smollm.tokenizer

    def count(s: str) -> int:
        return len(tok(s).input_ids)

    doc: Document = make_document(11, tokens, count)
    assert tokens <= count(doc.text) <= tokens + 400
