"""`make demo` (scripts/demo.py): what it prints is what the model does, and `--keep` leaves a usable model folder."""

import re

import pytest
from transformers import AutoModel, AutoTokenizer

from conftest import load_file

demo = load_file("scripts/demo.py")


def test_token_budget_table_compares_the_published_and_the_tiny_tile():
    lines = demo.token_budget_table(3840, 1600, 25, (56, 14))
    assert [line.split()[-3:] for line in lines[1:]] == [["px", "12", "3217"], ["px", "2", "97"]]
    published_only = demo.token_budget_table(3840, 1600, 55, None)
    assert len(published_only) == 2 and published_only[1].split()[-1] == "8137"


def test_demo_prints_grid_budget_prompt_layout_and_reply_and_keeps_the_model(tmp_path, capsys):
    keep = tmp_path / "tiny"
    demo.main(["--keep", str(keep), "--max-new-tokens", "8"])
    out = capsys.readouterr().out

    assert "3840 x 1600, hd_num 25" in out and "-> 3 rows x 7 cols = 21 crops, plus 1 global view" in out
    assert re.search(r"published model\s+336 px\s+12\s+3217\n", out)
    assert re.search(r"this model\s+56 px\s+2\s+97\n", out)
    # BOS, system + user header, 97 image positions, BOS, question + assistant header.
    runs = re.findall(r"^  (BOS|IMAGE|text)\s+(\d+) ids", out, re.MULTILINE)
    assert [kind for kind, _ in runs] == ["BOS", "text", "IMAGE", "BOS", "text"]
    assert [int(count) for kind, count in runs if kind != "text"] == [1, 97, 1]
    total = int(re.search(r"total (\d+) ids", out).group(1))
    assert total == sum(int(count) for _, count in runs)
    # The tiny model's reply is readable pieces: no byte soup, no markers.
    reply = re.search(r"^assistant: (.*)$", out, re.MULTILINE).group(1)
    assert reply.strip() and "\ufffd" not in reply and "[UNUSED_TOKEN_" not in reply
    assert re.search(r"time to first token \d+ ms \(pre-processing, vision tower and prefill of " + str(total), out)
    assert (keep / "layout.png").stat().st_size > 0 and f"wrote {keep / 'layout.png'}" in out
    assert "python scripts/demo.py --model PATH" in out

    # The kept folder is what the README's snippets load as `path`.
    model = AutoModel.from_pretrained(keep, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(keep, trust_remote_code=True)
    assert (model.config.vision_config.image_size, model.config.num_hidden_layers) == (56, 2)
    assert tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_140]") == model.config.image_token_id


def test_demo_refuses_a_non_empty_keep_folder_before_building(tmp_path):
    (tmp_path / "something.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        demo.main(["--keep", str(tmp_path)])
    assert [path.name for path in tmp_path.iterdir()] == ["something.txt"]


def test_demo_refuses_a_bad_hd_num_and_image_first(tmp_path):
    with pytest.raises(ValueError, match="hd_num"):
        demo.main(["--hd-num", "0", "--keep", str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError):
        demo.main(["--image", str(tmp_path / "missing.png"), "--keep", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
