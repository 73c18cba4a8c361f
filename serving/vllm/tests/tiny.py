"""A tiny random InternLM-XComposer2-4KHD folder that vLLM's CPU attention accepts (head_dim 32), built with the
root test helpers (tiny sentencepiece tokenizer, our code and JSON files, `save_pretrained` weights)."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import sentencepiece as spm
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]


def _root_conftest():
    spec = importlib.util.spec_from_file_location("ixc_root_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_model_dir(folder: Path) -> Path:
    """Code, config (hidden 128, 4 heads of 32, 2 kv heads), weights, tokenizer and generation config in `folder`.

    The weights are drawn wider than the default init (std 0.5), so greedy choices win by clear margins and a
    float rounding difference cannot flip them.
    """
    root = _root_conftest()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(root.SP_CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[f"[UNUSED_TOKEN_{index}]" for index in range(140, 147)],
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    sp_file = folder.parent / f"{folder.name}-tokenizer.model"
    sp_file.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    config = {
        **root.TINY_CONFIG,
        "vocab_size": sp.vocab_size(),
        "image_token_id": image_token_id,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.5,
        "hd_num": 4,
    }
    root.write_model_dir(folder, config)
    root.write_processor_dir(folder, sp_file, image_token_id)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "hd_num": 4}))
    turn_end = sp.piece_to_id("[UNUSED_TOKEN_145]")
    generation = {"bos_token_id": 1, "eos_token_id": [2, turn_end], "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation))

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(generation))  # save_pretrained wrote the config's
    Image.new("RGB", (200, 120), (200, 30, 30)).save(folder / "wide.png")
    Image.new("RGB", (90, 160), (30, 30, 200)).save(folder / "tall.png")
    return folder


if __name__ == "__main__":
    print(build_tiny_model_dir(Path(sys.argv[1])))
