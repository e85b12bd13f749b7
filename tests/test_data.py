import json

import pytest
import torch

from dictionary_learning.data import (
    batched_contexts,
    hf_text_source,
    text_file_source,
    token_contexts,
)
from dictionary_learning.embedded import (
    VALIDATION_PLAYS,
    embedded_corpus,
    play_paths,
    strip_markdown,
)
from tests.helpers import random_texts, tiny_tokenizer


def test_packing_round_trip_and_bos():
    tok = tiny_tokenizer()
    texts = random_texts(40, seed=1, max_len=25)  # many docs shorter than a context: packed
    ctxs = list(token_contexts(texts, tok, 16))
    assert all(c.shape == (16,) and c.dtype == torch.long for c in ctxs)
    assert all(int(c[0]) == tok.eos_token_id for c in ctxs)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = torch.cat([c[1:] for c in ctxs]).tolist()
    assert len(body) == (len(stream) // 15) * 15
    assert body == stream[: len(body)]


def test_sharding_disjoint_and_complete():
    tok = tiny_tokenizer()
    texts = random_texts(60, seed=2)
    full = list(token_contexts(texts, tok, 8))
    shards = [list(token_contexts(texts, tok, 8, rank=r, world_size=3)) for r in range(3)]
    assert sum(map(len, shards)) == len(full)
    for r, shard in enumerate(shards):
        for j, c in enumerate(shard):
            assert torch.equal(c, full[j * 3 + r])
    with pytest.raises(ValueError, match="rank"):
        list(token_contexts(texts, tok, 8, rank=3, world_size=3))


def test_non_string_error():
    with pytest.raises(TypeError, match="item 2 is a bytes"):
        list(token_contexts(["ab", "cd", b"x"], tiny_tokenizer(), 4))


def test_batched_contexts():
    ctxs = [torch.arange(4)] * 5
    shapes = [b.shape for b in batched_contexts(ctxs, 2)]
    assert shapes == [(2, 4), (2, 4), (1, 4)]


def test_hf_text_source_local_json(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(5)))
    docs = list(hf_text_source("json", split="train", field="body", data_files=str(f)))
    assert docs == [f"doc {i}" for i in range(5)]
    with pytest.raises(KeyError, match=r"available.*body"):
        list(hf_text_source("json", split="train", field="text", data_files=str(f)))
    docs = list(
        hf_text_source("json", split="train", field="body", streaming=False, data_files=str(f))
    )
    assert len(docs) == 5


def test_text_file_source(tmp_path):
    (tmp_path / "a.txt").write_text("first\n\nfile")
    (tmp_path / "b.txt").write_text("second")
    assert list(text_file_source(tmp_path)) == ["first\n\nfile", "second"]
    assert list(text_file_source(str(tmp_path / "b.txt"))) == ["second"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(text_file_source(tmp_path / "nope.txt"))


def test_strip_markdown():
    md = (
        "# Macbeth\n\n## ACT I\n\n_Thunder. Enter\nWitches_\n\n"
        "**First Witch**  \nWhen shall we  \nmeet again\n"
    )
    out = strip_markdown(md)
    assert out == (
        "Macbeth\n\nACT I\n\nThunder. Enter\nWitches\n\n"
        "First Witch\nWhen shall we\nmeet again\n"
    )
    assert "don_t" == strip_markdown("don_t").strip()


def test_embedded_corpus_split():
    assert len(play_paths()) == 38
    train, val = embedded_corpus("train"), embedded_corpus("validation")
    assert len(train) == 34 and len(val) == len(VALIDATION_PLAYS) == 4
    assert not set(train) & set(val)
    assert not any("**" in t or "\n#" in t for t in train + val)
    with pytest.raises(ValueError, match="split"):
        embedded_corpus("test")
