"""Bits per byte count the UTF-8 bytes each target token stands for: summed over an encoding, the per-token byte
counts `eval` derives from the tokenizer are the text's length in bytes (multi-byte characters included), and the
end-of-document token has none."""

from __future__ import annotations

from megatron_sgtm.data.tokenizer import EOD_TOKEN, train_bpe
from megatron_sgtm.evaluation.measure import token_bytes


def test_token_bytes_sum_to_the_texts_utf8_length(tmp_path):
    texts = ["the cat sat on the mat.", "el niño comió piñas en la montaña.", "ünïcödé — ≠ ✓ 猫"] * 20
    tokenizer = train_bpe(texts, 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    per_token = token_bytes(tmp_path / "tokenizer.json")
    for text in texts[:3]:
        ids = tokenizer.encode(text).ids
        assert int(per_token[ids].sum()) == len(text.encode()), text
    assert per_token[tokenizer.token_to_id(EOD_TOKEN)] == 0
