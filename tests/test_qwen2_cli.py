"""The text-generation CLI (``nexus-jax generate``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from configs.qwen2_5 import tiny
from nexus_jax import text_generation_cli
from tests.helpers.qwen2_reference import build_hf_model


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_cli_loads_hf_checkpoint_and_matches_transformers_generate(tmp_path, capsys):
    cfg = tiny(num_layers=1)
    hf = build_hf_model(cfg, seed=4)
    hf.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "cfg.json").write_text(json.dumps({"num_layers": 1}))
    rc = text_generation_cli.main([
        "--config", "tiny", "--config-json", str(tmp_path / "cfg.json"), "--hf-checkpoint", str(tmp_path / "ckpt"),
        "--prompt-ids", "5,17,300,2", "--prompt-ids", "9,9", "--max-new-tokens", "6",
    ])
    assert rc == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["prompt_ids"] for r in rows] == [[5, 17, 300, 2], [9, 9]]
    for row in rows:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([row["prompt_ids"]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert row["generated_ids"] == ref[0, len(row["prompt_ids"]) :].tolist()


def test_cli_bad_input_exits_2_with_message(capsys):
    assert text_generation_cli.main(["--prompt-ids", "1,2,384"]) == 2
    assert "token id 384 is out of range" in capsys.readouterr().err
    assert text_generation_cli.main([]) == 2
    assert "at least one --prompt" in capsys.readouterr().err


def test_cli_text_prompt_with_byte_tokenizer_is_deterministic(capsys):
    argv = ["--prompt", "a red fox", "--max-new-tokens", "8", "--seed", "3"]
    assert text_generation_cli.main(argv) == 0
    [row] = _json_lines(capsys.readouterr().out)
    assert row["prompt_ids"] == list(b"a red fox")
    assert len(row["generated_ids"]) == 8 and all(0 <= t < tiny().vocab_size for t in row["generated_ids"])
    assert isinstance(row["text"], str)
    direct = text_generation_cli.run(tiny(), [list(b"a red fox")], max_new_tokens=8, seed=3)
    assert direct[0]["generated_ids"] == row["generated_ids"]


def test_left_pad_rejects_empty_prompt():
    ids, mask = text_generation_cli.left_pad([[1, 2, 3], [4]], pad_id=0)
    np.testing.assert_array_equal(ids, [[1, 2, 3], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    with pytest.raises(ValueError, match="at least one token"):
        text_generation_cli.left_pad([[1], []], pad_id=0)
