"""Fine-tune InternLM-XComposer2-4KHD with the transformers `Trainer`: full fine-tuning, or LoRA through peft, on
conversations in the official JSON format (docs/model.md section 7; data loading in `finetune_data.py`).

    python scripts/finetune.py --model_name_or_path MODEL --data_path data.json --output_dir out \
        --bf16 --use_lora --learning_rate 5e-5 --gradient_checkpointing --per_device_train_batch_size 1

Every `TrainingArguments` option works (DeepSpeed and FSDP configs are in `configs/`); the options added here are
the dataclass fields below. `--resume_from_checkpoint last` continues from the newest complete checkpoint in
`--output_dir`, e.g. after the job was killed. The output folder holds the model (or the LoRA adapter) with the tokenizer and processor
files; merge an adapter into full weights with `scripts/merge_lora.py`.
"""

import dataclasses
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# cli.py and finetune_data.py sit beside this file; make them importable when this file is loaded by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli import check_model_folder, quiet_third_party, run  # noqa: E402

quiet_third_party()  # before transformers' Trainer imports peft, which imports bitsandbytes
import torch  # noqa: E402
from finetune_data import MAX_HD_NUM, ConversationDataset, DataCollator, read_sources  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to load and which of its parts to train."""

    model_name_or_path: str = field(metadata={"help": "A folder (or Hub id) with the weights and our remote code."})
    fix_vit: bool = field(default=True, metadata={"help": "Freeze the CLIP vision tower `vit`."})
    fix_sampler: bool = field(default=False, metadata={"help": "Freeze the projector `vision_proj`."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters on the LLM linears; the LLM is frozen, the unfixed vision parts train."},
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})
    lora_target_modules: str = field(
        default="wqkv,wo,w1,w2,w3", metadata={"help": "Comma-separated names of the linears that get LoRA."}
    )

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise ValueError(f"--lora_r must be >= 1 and --lora_alpha > 0, got {self.lora_r} and {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if not self.target_modules:
            raise ValueError("--lora_target_modules names no module; pass e.g. 'wqkv,wo,w1,w2,w3'.")

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


@dataclass
class DataArguments:
    """Where the training conversations are and how their images are cut."""

    data_path: str = field(metadata={"help": "A JSON list of samples, or a data.txt mixing several JSON files."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder of relative image paths (default: each JSON file's folder)."}
    )
    hd_num: int = field(default=16, metadata={"help": "Maximum crops per image (a data.txt line may override)."})
    max_length: int = field(default=4096, metadata={"help": "Longest example in ids; longer ones are dropped."})

    def __post_init__(self):
        if self.hd_num < 1 or self.max_length < 1:
            raise ValueError(f"--hd_num and --max_length must be >= 1, got {self.hd_num} and {self.max_length}.")
        if self.hd_num > MAX_HD_NUM:
            raise ValueError(f"--hd_num must be at most {MAX_HD_NUM}, got {self.hd_num}; the published model used 9 to 65.")


def translate_options(argv: list[str]) -> list[str]:
    """The command line with options that transformers renamed spelled the installed version's way, so one recipe
    runs on transformers 4 and 5 without errors or deprecation warnings: `--warmup_ratio` (gone in 5, where a
    `--warmup_steps` below 1 is a ratio) and `--gradient_checkpointing[_kwargs]` (`--activation_checkpointing` from
    5.20 on; the old name warns there)."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    renames = {}
    if "warmup_ratio" not in fields:
        renames["--warmup_ratio"] = "--warmup_steps"
    old, new = "--gradient_checkpointing", "--activation_checkpointing"
    if new[2:] not in fields:
        old, new = new, old
    renames.update({old: new, f"{old}_kwargs": f"{new}_kwargs"})
    translated = []
    for argument in argv:
        name, equals, value = argument.partition("=")
        translated.append(renames.get(name, name) + equals + value)
    return translated


def prepare_training_args(training_args: TrainingArguments):
    """Settings this model needs whatever the command line says, and better defaults.

    `remove_unused_columns` is forced off because the collator's `pixel_values` and `image_grids` must reach
    `forward`. Gradient checkpointing defaults to the non-reentrant variant, which needs no input gradients (frozen
    embeddings under LoRA) and recomputes Partial LoRA exactly; transformers 5 renamed its kwargs field. Pinned
    memory is switched off without an accelerator, where it does nothing but warn on every data loader.
    """
    training_args.remove_unused_columns = False
    if training_args.use_cpu or not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False
    name = next(
        name
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
        if hasattr(training_args, name)
    )
    if getattr(training_args, name) is None:
        setattr(training_args, name, {"use_reentrant": False})


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: a given path as is, or for `last` the newest complete checkpoint in
    `output_dir` (one whose `trainer_state.json`, written last, exists; a run killed while saving leaves an
    incomplete folder behind), or `None` to start afresh when there is none yet."""
    if resume_from_checkpoint != "last":
        return resume_from_checkpoint
    complete = [
        path
        for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    if not complete:
        logger.warning(f"No complete checkpoint in {output_dir} to resume from; training starts from the beginning.")
        return None
    last = max(complete, key=lambda path: int(path.name.split("-")[-1]))
    logger.info(f"Resuming from {last}.")
    return str(last)


def select_trainable(model, model_args: ModelArguments, checkpointing: bool):
    """Full fine-tuning: everything trains except the vision parts that `fix_vit` / `fix_sampler` freeze.
    LoRA: peft freezes the model, adds adapters to `lora_target_modules` and trains full copies of the unfixed
    vision parts (`modules_to_save`, stored with the adapter). Returns the model to train."""
    if not model_args.use_lora:
        model.requires_grad_(True)
        model.vit.requires_grad_(not model_args.fix_vit)
        model.vision_proj.requires_grad_(not model_args.fix_sampler)
        return model
    if checkpointing:
        # Reentrant checkpointing backpropagates into a layer only if its input requires grad. With the embeddings
        # frozen, a text-only batch would leave every adapter without a gradient, and transformers 4 does not turn
        # this on for a model that peft wraps after loading.
        model.enable_input_require_grads()
    frozen = {"vision_proj": model_args.fix_sampler, "vit": model_args.fix_vit}
    modules_to_save = [name for name, fixed in frozen.items() if not fixed]
    # No task_type: a plain PeftModel hands the Trainer's batch to our forward unchanged, where PeftModelForCausalLM
    # adds arguments of its own (`output_attentions`, ...). peft wraps each PLoRA linear (an nn.Linear subclass) and
    # calls it with our `lora_mask` argument, so the Partial LoRA branch keeps applying under the adapter.
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.target_modules,
        modules_to_save=modules_to_save or None,
    )
    with warnings.catch_warnings():
        # peft reads the property transformers 5.20 renamed; the warning is about peft's code, not this run.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def main(argv=None, callbacks=None) -> Trainer:
    """Parse `argv` (default: the command line), train, and save the model or adapter with the tokenizer and
    processor to `output_dir`.

    Args:
        argv (`list[str]`, *optional*): command-line arguments, for calling this in-process.
        callbacks (`list[TrainerCallback]`, *optional*): extra Trainer callbacks.
    Returns:
        The `Trainer`, after training and saving.
    """
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = translate_options(sys.argv[1:] if argv is None else [str(argument) for argument in argv])
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    prepare_training_args(training_args)
    check_model_folder(model_args.model_name_or_path)
    sources = read_sources(data_args.data_path)  # a missing or malformed data file fails before the model loads
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)  # LoRA's initial weights and the dataset draw are then the same on every rank

    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=True,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    processor = model.build_processor(tokenizer, data_args.hd_num)
    # Saving then writes the processor's auto_map and code files too, so the output folder loads with AutoProcessor.
    processor.register_for_auto_class()
    processor.image_processor.register_for_auto_class()

    dataset = ConversationDataset(
        processor,
        sources,
        max_length=data_args.max_length,
        hd_num=data_args.hd_num,
        image_folder=data_args.image_folder,
        seed=training_args.seed,
    )
    model = select_trainable(model, model_args, training_args.gradient_checkpointing)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info(f"{len(dataset)} training examples; {trainable:,} of {total:,} parameters train.")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollator(tokenizer.pad_token_id),
        processing_class=processor,
        callbacks=callbacks,
    )
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # the model or adapter, and the processor with its tokenizer
    trainer.save_state()
    # Under torchrun, the ranks wait for each other's saving, then each tears its process group down itself: left to
    # interpreter exit, gloo's threads can abort a rank ("terminate called without an active exception") after
    # training has succeeded.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run(main)
