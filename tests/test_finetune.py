"""Fine-tuning with scripts/finetune.py and scripts/merge_lora.py on a tiny model and a synthetic colour-question data
set: the loss falls (full and LoRA), LoRA trains only its adapter and keeps Partial LoRA working, gradient
accumulation and checkpointing change nothing, two DDP processes stay identical, a resumed run continues the same
loss curve, and a merged adapter gives the adapter's logits."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import sentencepiece as spm
import torch
from conftest import ROOT, TINY_CONFIG, load_file, write_model_dir, write_processor_dir
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, TrainerCallback

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
# At the tiny tile size (56 px) and hd_num 2 these give grids 1 x 1, 1 x 2 and 2 x 1.
IMAGE_SIZES = [(56, 56), (110, 60), (60, 110)]
TEXT_TURNS = [
    ("Hello! Who are you?", "A helpful assistant."),
    ("How many people are there in the story?", "Two people."),
    ("What is the quick brown fox doing?", "It jumps over the lazy dog."),
]
COMMON_OPTIONS = [
    "--hd_num", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
    "--save_strategy", "no", "--seed", "0", "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True",
    "--dataloader_num_workers", "0",
]  # fmt: skip
LORA_OPTIONS = ["--use_lora", "True", "--lora_r", "8", "--lora_alpha", "16", "--fix_vit", "False"]
# peft and our own `--gradient_checkpointing*` options use names transformers 5 deprecates.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning"),
]


finetune = load_file("scripts/finetune.py")
merge_lora = load_file("scripts/merge_lora.py")


def write_model(folder, sp_model_file, **overrides):
    """A tiny random model with its tokenizer and processor in `folder`. Its weights are drawn 5x wider than the
    default init, as a stand-in for a trained model: with the default's tiny logits a frozen output head caps
    what LoRA can learn."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_file))
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    settings = {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id}
    write_model_dir(folder, {**settings, "initializer_range": 0.1, **overrides})
    write_processor_dir(folder, sp_model_file, image_token_id)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(folder)
    return folder


def write_dataset(folder, num_samples, seed=0):
    """`num_samples` official-format samples in `folder`/data.json: a coloured square on white, asked "What colour
    is the square?", and every fourth sample a text-only question."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for index in range(num_samples):
        if index % 4 == 3:
            question, answer = TEXT_TURNS[index // 4 % len(TEXT_TURNS)]
            samples.append({"id": str(index), "conversations": [
                {"from": "user", "value": question}, {"from": "assistant", "value": answer}]})  # fmt: skip
            continue
        colour = rng.choice(list(COLOURS))
        width, height = rng.choice(IMAGE_SIZES)
        side = min(width, height) // 2
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        image = Image.new("RGB", (width, height), (255, 255, 255))
        ImageDraw.Draw(image).rectangle([left, top, left + side, top + side], fill=COLOURS[colour])
        image.save(folder / f"{index}.png")
        samples.append({"id": str(index), "image": [f"{index}.png"], "conversations": [
            {"from": "user", "value": "<ImageHere>What colour is the square?"},
            {"from": "assistant", "value": f"The square is {colour}."}]})  # fmt: skip
    (folder / "data.json").write_text(json.dumps(samples))
    return folder / "data.json"


def run_finetune(model_dir, data_file, output_dir, *options, callbacks=None):
    """scripts/finetune.py main() in this process, with the options every test shares, then `options`."""
    argv = ["--model_name_or_path", model_dir, "--data_path", data_file, "--output_dir", output_dir, *COMMON_OPTIONS]
    return finetune.main([str(arg) for arg in [*argv, *options]], callbacks=callbacks)


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class Recorder(TrainerCallback):
    """Records the parameters when training begins, the gradients before each optimizer step, and how often the
    first decoder layer's attention runs (twice per forward when checkpointing recomputes it)."""

    def __init__(self):
        self.start, self.grads, self.attention_calls = {}, [], 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.model.layers[0].attention.register_forward_pre_hook(self.count_attention_call)

    def count_attention_call(self, module, args):
        self.attention_calls += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})


def losses_by_step(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def changed_parameters(model, start):
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, start[name])}


def eval_inputs(processor, data_dir):
    """A left-padded batch of an image question and a text-only question."""
    prompts = [processor.build_prompt("<ImageHere>What colour is the square?"), processor.build_prompt("Hello!")]
    return processor(prompts, images=[[str(data_dir / "0.png")], []], hd_num=2)


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a busy 2-core machine they spin: one thread runs
    this module 4x faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_model_file):
    return write_model(tmp_path_factory.mktemp("finetune") / "tiny", sp_model_file)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("colours"), 24)


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def lora_run(model_dir, data_file, tmp_path_factory):
    """(trainer, recorder): 32 LoRA steps that also train the vision tower and projector (modules_to_save)."""
    recorder = Recorder()
    output_dir = tmp_path_factory.mktemp("lora") / "adapter"
    trainer = run_finetune(model_dir, data_file, output_dir, "--max_steps", "32", *LORA_OPTIONS, callbacks=[recorder])
    return trainer, recorder


def test_full_finetuning_lowers_the_loss_and_saves_a_loadable_model(model_dir, data_file, processor, tmp_path):
    recorder = Recorder()
    trainer = run_finetune(model_dir, data_file, tmp_path / "out", "--max_steps", "32", callbacks=[recorder])
    losses = logged_losses(trainer)
    assert len(losses) == trainer.state.global_step == 32
    assert sum(losses[-4:]) / 4 < 0.5 * losses[0]
    # fix_vit (the default) keeps the vision tower. After the last layer's attention, Partial LoRA only reaches the
    # logits of image positions, which predict no trained label, so those branches get no gradient; all else trains.
    last_layer = f"model.layers.{trainer.model.config.num_hidden_layers - 1}."
    idle = {
        name
        for name, _ in trainer.model.named_parameters()
        if name.startswith("vit.") or (name.startswith(last_layer) and ".Plora_" in name and ".wqkv." not in name)
    }
    assert changed_parameters(trainer.model, recorder.start) == set(recorder.start) - idle

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    inputs = eval_inputs(AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True), data_file.parent)
    assert torch.equal(inputs["input_ids"], eval_inputs(processor, data_file.parent)["input_ids"])
    assert max_diff(logits(saved, inputs), logits(trainer.model, inputs)) == 0


def test_bf16_loads_and_trains_in_bfloat16(model_dir, data_file, tmp_path, monkeypatch):
    # transformers 4 records --bf16 in this variable, where every later Trainer of the process would pick it up.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    trainer = run_finetune(model_dir, data_file, tmp_path / "out", "--max_steps", "8", "--bf16", "True")
    assert {parameter.dtype for parameter in trainer.model.parameters()} == {torch.bfloat16}
    losses = logged_losses(trainer)
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < 0.8 * losses[0]


def test_lora_trains_only_the_adapter_and_saves_it(lora_run, model_dir, data_file, processor):
    trainer, recorder = lora_run
    losses = logged_losses(trainer)
    assert len(losses) == 32 and sum(losses[-4:]) / 4 < 0.5 * losses[0]

    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert all(".lora_" in name or ".modules_to_save." in name for name in trainable)
    assert any(".vit.modules_to_save." in name for name in trainable)
    assert any(".vision_proj.modules_to_save." in name for name in trainable)
    # Every trained tensor moved and no base weight did.
    assert changed_parameters(trainer.model, recorder.start) == trainable

    output_dir = trainer.args.output_dir
    with safe_open(f"{output_dir}/adapter_model.safetensors", "pt") as adapter:
        saved_names = list(adapter.keys())
    assert any(".lora_A." in name for name in saved_names) and any(".lora_B." in name for name in saved_names)
    assert any(".vit." in name for name in saved_names) and any(".vision_proj." in name for name in saved_names)
    assert all(".lora_" in name or ".vit." in name or ".vision_proj." in name for name in saved_names)

    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    reloaded = PeftModel.from_pretrained(base, output_dir)
    inputs = eval_inputs(processor, data_file.parent)
    assert max_diff(logits(reloaded, inputs), logits(trainer.model, inputs)) <= 1e-6


def test_partial_lora_still_applies_under_the_peft_adapter(lora_run, model_dir, processor, data_file):
    """peft wraps each PLoRA linear and passes `lora_mask` through: in the last layer's w2 (nothing mixes positions
    after it) the Partial LoRA branch moves only image positions, while peft's own LoRA moves every position."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, lora_run[0].args.output_dir)
    w2 = model.get_base_model().model.layers[-1].feed_forward.w2
    assert type(w2.base_layer).__name__ == "PLoRA" and hasattr(w2, "lora_A")

    prompt = processor.build_prompt("<ImageHere>What colour is the square?")
    inputs = processor(prompt, images=[str(data_file.parent / "0.png")], hd_num=2)
    image_positions = inputs["input_ids"][0] == model.config.image_token_id
    before = logits(model, inputs)[0]
    with torch.no_grad():
        w2.base_layer.Plora_B.weight.zero_()
    without_plora = logits(model, inputs)[0]
    with torch.no_grad():
        w2.lora_B["default"].weight.zero_()
    without_both = logits(model, inputs)[0]

    plora_change = (before - without_plora).abs().amax(dim=-1)
    assert plora_change[~image_positions].max().item() == 0
    assert plora_change[image_positions].min().item() > 1e-4
    assert (without_plora - without_both).abs().amax(dim=-1).min().item() > 1e-4


def test_gradient_accumulation_equals_one_large_batch(sp_model_file, tmp_path):
    """2 micro-batches of 2 take the same SGD step as one batch of 4: the Trainer passes `num_items_in_batch` and
    the loss is a mean over all labelled tokens, not a mean of micro-batch means (their token counts differ)."""
    model_dir = write_model(tmp_path / "no_dropout", sp_model_file, plora_dropout=0.0)
    data_file = write_dataset(tmp_path / "four", 4)  # 3 images of different grids, 1 text-only sample
    updates = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        recorder = Recorder()
        trainer = run_finetune(
            model_dir, data_file, tmp_path / f"out{batch_size}", "--max_steps", "1", "--optim", "sgd",
            "--max_grad_norm", "0", "--fix_vit", "False", "--per_device_train_batch_size", batch_size,
            "--gradient_accumulation_steps", accumulation, callbacks=[recorder],
        )  # fmt: skip
        updates.append({name: p.detach() - recorder.start[name] for name, p in trainer.model.named_parameters()})
    one_batch, accumulated = updates
    assert max(update.abs().max().item() for update in one_batch.values()) > 1e-3
    assert max(max_diff(one_batch[name], accumulated[name]) for name in one_batch) <= 1e-7


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_lora_gradients(model_dir, reentrant, tmp_path):
    """One step of 4 micro-batches of 1, one of them text-only: with frozen embeddings and no image, the reentrant
    variant only reaches the adapters if the script makes the embeddings' output require grad."""
    data_file = write_dataset(tmp_path / "four", 4)
    options = ["--max_steps", "1", "--max_grad_norm", "0", "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "4", *LORA_OPTIONS]  # fmt: skip
    checkpointing = ["--gradient_checkpointing", "True",
                     "--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": reentrant})]  # fmt: skip
    runs = []
    for extra in ([], checkpointing):
        recorder = Recorder()
        run_finetune(model_dir, data_file, tmp_path / f"out{len(runs)}", *options, *extra, callbacks=[recorder])
        runs.append(recorder)
    plain, checkpointed = runs
    assert (plain.attention_calls, checkpointed.attention_calls) == (4, 8)  # the layer really is recomputed
    grads, grads_checkpointed = plain.grads[0], checkpointed.grads[0]
    assert grads.keys() == grads_checkpointed.keys()
    assert any(".lora_B." in name for name in grads) and any(".vit.modules_to_save." in name for name in grads)
    assert max(max_diff(grads[name], grads_checkpointed[name]) for name in grads) <= 1e-6


DDP_WRAPPER = """
    import hashlib, importlib.util, json, sys
    from transformers import TrainerCallback

    finetune_path, results_dir, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    spec = importlib.util.spec_from_file_location("finetune", finetune_path)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)


    class Record(TrainerCallback):
        def __init__(self):
            self.with_images = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(self.record_batch, with_kwargs=True)

        def record_batch(self, module, args, kwargs):
            self.with_images.append(kwargs.get("pixel_values") is not None)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for parameter in model.parameters():
                if parameter.requires_grad:
                    digest.update(parameter.detach().numpy().tobytes())
            result = {
                "world_size": args.world_size,
                "global_step": state.global_step,
                "losses": [entry["loss"] for entry in state.log_history if "loss" in entry],
                "with_images": self.with_images,
                "parameters_sha256": digest.hexdigest(),
            }
            with open(f"{results_dir}/rank{args.process_index}.json", "w") as file:
                json.dump(result, file)


    finetune.main(argv, callbacks=[Record()])
"""


def test_two_ddp_processes_stay_identical(model_dir, data_file, processor, tmp_path):
    """Full fine-tuning with the vision tower trainable and find_unused_parameters off: batches without images
    must still give every vision parameter a gradient, or DDP's gradient buckets fall out of step and hang.
    (`processor` is loaded first so that both ranks find all our remote code in the modules cache.)"""
    wrapper = tmp_path / "ddp_wrapper.py"
    wrapper.write_text(textwrap.dedent(DDP_WRAPPER))
    results = tmp_path / "results"
    results.mkdir()
    options = [
        "--model_name_or_path", model_dir, "--data_path", data_file, "--output_dir", tmp_path / "out", *COMMON_OPTIONS,
        "--per_device_train_batch_size", "1", "--max_steps", "6", "--fix_vit", "False",
        "--ddp_find_unused_parameters", "False",
    ]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", wrapper,
               ROOT / "scripts" / "finetune.py", results, *options]  # fmt: skip
    # Its own session, so a hung run (ranks out of step wait forever) can be killed with its workers.
    process = subprocess.Popen([str(arg) for arg in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run hung:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]

    rank0, rank1 = (json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == len(rank0["losses"]) == 6
    assert rank0["losses"] == rank1["losses"]
    assert rank0["parameters_sha256"] == rank1["parameters_sha256"]
    # Some steps had an image batch on one rank and a text-only batch on the other.
    assert len(rank0["with_images"]) == len(rank1["with_images"]) == 6
    assert rank0["with_images"] != rank1["with_images"]


def test_resumed_run_continues_the_same_loss_curve(model_dir, data_file, tmp_path):
    options = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3"]
    straight = run_finetune(model_dir, data_file, tmp_path / "straight", *options)
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file()
    resumed = run_finetune(model_dir, data_file, tmp_path / "resumed", *options, "--resume_from_checkpoint", checkpoint)
    expected, got = losses_by_step(straight), losses_by_step(resumed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert max(abs(got[step] - expected[step]) for step in (4, 5, 6)) <= 1e-5


# The killed run's logged losses and checkpoint are compared with in-process runs, which use one thread (`one_thread`);
# another thread count sums in another order and moves the losses by ~1e-5, so the subprocess uses one thread too.
SLOW_WRAPPER = """
    import sys, time
    import torch
    from transformers import TrainerCallback

    sys.path.insert(0, sys.argv[1])
    import finetune

    torch.set_num_threads(1)


    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.3)


    finetune.main(sys.argv[2:], callbacks=[Slow()])
"""


def test_killed_run_resumes_from_its_last_complete_checkpoint(model_dir, data_file, processor, tmp_path):
    """A training process killed mid-run (SIGKILL, no clean-up) continues with `--resume_from_checkpoint last`
    from its newest complete checkpoint, skipping a half-written one, and logs the uninterrupted run's losses."""
    options = ["--max_steps", "10", "--save_strategy", "steps", "--save_steps", "2"]
    wrapper = tmp_path / "slow_wrapper.py"
    wrapper.write_text(textwrap.dedent(SLOW_WRAPPER))
    output_dir = tmp_path / "killed"
    argv = ["--model_name_or_path", model_dir, "--data_path", data_file, "--output_dir", output_dir, *COMMON_OPTIONS]
    command = [sys.executable, wrapper, ROOT / "scripts", *argv, *options]
    process = subprocess.Popen([str(arg) for arg in command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        for _ in range(1200):  # up to 2 minutes for loading and 4 steps
            if (output_dir / "checkpoint-4" / "trainer_state.json").is_file() or process.poll() is not None:
                break
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        _, errors = process.communicate()
    assert process.returncode == -signal.SIGKILL, errors[-3000:]
    assert not (output_dir / "checkpoint-10").exists()
    complete = sorted(int(path.parent.name.split("-")[1]) for path in output_dir.glob("checkpoint-*/trainer_state.json"))
    assert complete and complete[-1] >= 4
    (output_dir / "checkpoint-9").mkdir()  # a checkpoint the kill cut short: no trainer_state.json
    (output_dir / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    assert finetune.resolve_checkpoint("last", output_dir) == str(output_dir / f"checkpoint-{complete[-1]}")

    resumed = run_finetune(model_dir, data_file, output_dir, *options, "--resume_from_checkpoint", "last")
    straight = run_finetune(model_dir, data_file, tmp_path / "straight", *options)
    got, expected = losses_by_step(resumed), losses_by_step(straight)
    assert resumed.state.global_step == 10 and sorted(got) == sorted(expected) == list(range(1, 11))
    assert max(abs(got[step] - expected[step]) for step in got) <= 1e-5


def test_merged_lora_model_gives_the_adapter_logits(lora_run, model_dir, data_file, tmp_path):
    adapter_dir = lora_run[0].args.output_dir
    argv = ["--base", model_dir, "--adapter", adapter_dir, "--output", tmp_path / "merged", "--dtype", "float32"]
    merge_lora.main([str(arg) for arg in argv])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    assert merged.state_dict().keys() == base.state_dict().keys()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    inputs = eval_inputs(processor, data_file.parent)
    base_logits = logits(base, inputs)
    merged_logits = logits(merged, inputs)
    assert max_diff(merged_logits, logits(PeftModel.from_pretrained(base, adapter_dir), inputs)) <= 1e-5
    assert max_diff(merged_logits, base_logits) > 1e-1  # the adapter did change the model


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--hd_num", "0", "--hd_num and --max_length must be >= 1"), ("--lora_target_modules", " , ", "names no module")],
)
def test_bad_arguments_raise_before_loading(option, value, message, tmp_path):
    argv = ["--model_name_or_path", str(tmp_path / "absent"), "--data_path", "x.json", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=message):
        finetune.main([*argv, option, value])


def test_training_and_saving_need_no_network(model_dir, data_file, tmp_path, no_network):
    trainer = run_finetune(model_dir, data_file, tmp_path / "offline", "--max_steps", "2", *LORA_OPTIONS)
    assert trainer.state.global_step == 2
    assert (tmp_path / "offline" / "adapter_model.safetensors").is_file()
