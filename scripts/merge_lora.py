"""Merge a LoRA adapter from scripts/finetune.py into its base model and save full safetensors weights, with the
code, tokenizer and processor files, so the folder loads like the published model (no peft needed).

    python scripts/merge_lora.py --base MODEL --adapter ADAPTER_DIR --output OUT [--dtype bfloat16]
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import check_model_folder, quiet_third_party, run  # noqa: E402

quiet_third_party()  # before peft imports bitsandbytes
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(base: str, adapter: str, output: str, dtype: str = "auto"):
    """Load `base`, apply the adapter in `adapter`, fold it into the weights and save everything to `output`.

    The LoRA deltas are added to the wrapped linears and the adapter's trained copies of `vit` / `vision_proj`
    (its `modules_to_save`) replace the base ones. The tokenizer and processor come from the adapter folder when
    finetune.py saved them there, otherwise from the base model.

    Args:
        base (`str`): folder or Hub id of the base model (our remote code and weights).
        adapter (`str`): folder holding `adapter_config.json` and the adapter weights.
        output (`str`): folder to write.
        dtype (`str`): "auto" (the checkpoint's dtype), "float32", "bfloat16" or "float16".
    Raises:
        `FileNotFoundError`: if `adapter` holds no adapter. `ValueError`: for an unknown dtype.
    """
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    check_model_folder(base, "base model folder")
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"No adapter_config.json in {adapter}; pass the --output_dir of a `finetune.py --use_lora` run."
        )
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype=DTYPES[dtype])
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(output)  # safetensors weights, config, generation config and the model code
    processor_source = adapter if (Path(adapter) / "processor_config.json").is_file() else base
    AutoProcessor.from_pretrained(processor_source, trust_remote_code=True).save_pretrained(output)
    logger.info(f"Merged {adapter} into {base}; saved to {output} (tokenizer and processor from {processor_source}).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model folder or Hub id")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder (finetune.py --use_lora output)")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="dtype to load and save in")
    args = parser.parse_args(argv)
    merge(args.base, args.adapter, args.output, args.dtype)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(main)
