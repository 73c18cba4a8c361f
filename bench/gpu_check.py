"""One prepared GPU check: every CUDA path of the model and the real-shape numbers in a single run, written as one
JSON file and one Markdown table.

    python bench/gpu_check.py --out DIR             # a CUDA machine: the 7B shape, bf16, random weights (`make gpu-check`)
    python bench/gpu_check.py --out DIR --dry-run   # CPU, tiny shapes, seconds: the same code paths (CI runs this)

The parts, in order of value; each is guarded (a failure is recorded and the rest still run), and the run stops
itself when its time budget is spent, counted from before the imports:
  1. the test suite's CUDA tests (skip reasons naming CUDA or a GPU, and the bitsandbytes tests), in a subprocess;
  2. time to first token for 3840x1600 at hd_num 55 from the raw image, split into pre-processing, vision and
     prefill, and the request's peak memory;
  3. decode tokens/s at batch 1 and 8 with a dynamic cache, a static cache and a compiled static cache, against
     transformers' `LlamaForCausalLM` of the same dimensions and against the bandwidth bound;
  4. bf16 against fp32 (the same weights, upcast): logits and greedy agreement over the decode steps;
  5. fp16 autocast over bf16 weights, the model card's setting, end to end from the raw image;
  6. bitsandbytes 4-bit NF4 and 8-bit: peak memory and agreement with bf16 (skipped without bitsandbytes);
  7. a LoRA training step (the official recipe) at hd_num 16 on a 4k-token sample with gradient checkpointing;
  8. `device_map="auto"` with a `max_memory` that splits the model between the GPU and the CPU: the same logits.
"Agreement" compares top-1 ids with the bf16 model's greedy ids, teacher-forced (each position after the same
prefix); `greedy_agreement` is the free-running share. Random weights: speed and memory are real, text is not.
"""

import time

START = time.monotonic()  # the budget counts the imports below

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ElementTree  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from bench_generate import CACHES, CASES, QUERY, build_ours, case_image, copy_bandwidth, decode_weight_bytes  # noqa: E402
from bench_llm import LLM_DIMS, build_llama, synchronized  # noqa: E402
from bench_preprocess import median_seconds  # noqa: E402
from gpu_report import evaluate_targets, render  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LogitsProcessor, LogitsProcessorList  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.bfloat16
# Part 1 runs the tests whose skip reason names CUDA or a GPU, and the bitsandbytes tests (by name), which load
# onto CUDA when it is there.
CUDA_REASON = re.compile(r"\bCUDA\b|\bGPUs?\b")
BITSANDBYTES_TESTS = re.compile(r"quantized|bitsandbytes|[48]bit")
ANSWER = "The assistant describes the image in detail, row by row, and reads every word of the document. "


@dataclass(frozen=True)
class Settings:
    """What one mode measures. `part_caps_s` bounds the parts that could eat the budget (tests, compiling)."""

    size: str  # bench_generate's model size: "7b" (the shipped config.json) or "tiny"
    device: str
    case: str  # the request of parts 2-6 and 8, a bench_generate case
    lora_case: str
    lora_tokens: int
    batch_sizes: tuple
    decode_steps: int
    device_map_steps: int
    repeats: int
    budget_s: float
    part_caps_s: dict
    min_start_s: float  # a part or decode row does not start with less time than this left


REAL = Settings(size="7b", device="cuda", case="3840x1600@55", lora_case="1920x1080@16", lora_tokens=4096,
                batch_sizes=(1, 8), decode_steps=32, device_map_steps=8, repeats=1, budget_s=450,
                part_caps_s={"1_cuda_tests": 100, "3_decode": 180}, min_start_s=20)  # fmt: skip
DRY = Settings(size="tiny", device="cpu", case="3840x1600@55", lora_case="1920x1080@16", lora_tokens=1024,
               batch_sizes=(1, 8), decode_steps=8, device_map_steps=4, repeats=1, budget_s=540,
               part_caps_s={"1_cuda_tests": 150, "3_decode": 120}, min_start_s=0)  # fmt: skip


class OutOfTime(BaseException):
    """Raised by the alarm when the budget is spent; a BaseException so no library's `except Exception` eats it."""


class SkipPart(Exception):
    """A part that cannot run here (e.g. bitsandbytes missing); recorded as skipped with the reason."""


class StepClock(LogitsProcessor):
    """Records when each generation step's logits are ready (after a device sync), without changing them."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def with_peak(device, function):
    """`function()` and the peak bytes allocated on `device` while it ran, everything resident included (None off
    CUDA, where no allocator counts them)."""
    if device.type != "cuda":
        return function(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = function()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device)


@torch.no_grad()
def greedy(model, inputs, steps, pad_token_id, **kwargs):
    """The (B, steps) new ids of greedy generation; min_new_tokens, so a random model does not stop on EOS."""
    output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            pad_token_id=pad_token_id, **kwargs)  # fmt: skip
    return output[:, inputs["input_ids"].shape[1] :]


@torch.no_grad()
def next_token_logits(model, inputs, ids):
    """(B, steps, vocab) logits, moved to the CPU, that predict each of `ids` (B, steps) after the prompt, from one
    teacher-forced forward over the prompt and `ids`."""
    steps = ids.shape[1]
    ids = ids.to(inputs["input_ids"].device)
    extended = {
        **inputs,
        "input_ids": torch.cat([inputs["input_ids"], ids[:, :-1]], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, :-1])], dim=1),
    }
    return model(**extended, logits_to_keep=steps).logits.cpu()


def decode_speed(model, inputs, steps, cache, pad_token_id, repeats):
    """Decode tokens/s per sequence of greedy generation, after one warm-up call: one over the median time between
    two steps' logits (the prefill is left out, and so is a one-off graph capture or recompile in a step)."""
    speeds = []
    for _ in range(1 + repeats):
        clock = StepClock(model.device)
        greedy(model, inputs, steps, pad_token_id, logits_processor=LogitsProcessorList([clock]), **CACHES[cache])
        speeds.append(1 / statistics.median(after - before for before, after in zip(clock.times, clock.times[1:])))
    return statistics.median(speeds[1:])


class Check:
    """One run's settings, clock and shared state: our bf16 model, its processors, the requests, the reference
    outputs and a saved checkpoint, each built on first use, so every part runs whichever parts came before it."""

    def __init__(self, settings, workdir, out):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.workdir, self.out = workdir, out
        self.deadline = self.part_deadline = START + settings.budget_s
        self.part_cap_s = None
        self._model = self.tokenizer = self._reference = self._checkpoint = None
        self._processors, self._requests = {}, {}

    def time_left(self):
        return self.deadline - time.monotonic()

    def time_left_in_part(self):
        return min(self.deadline, self.part_deadline) - time.monotonic()

    def start_part(self, cap_s):
        """Set the alarm to the budget's end, or to `cap_s` from now if that comes first (None: no cap)."""
        self.part_cap_s = cap_s
        self.part_deadline = time.monotonic() + cap_s if cap_s else self.deadline
        signal.setitimer(signal.ITIMER_REAL, max(self.time_left_in_part(), 0.01))

    def model(self):
        """Our model with random bf16 weights, initialised on the device (no CPU init of 8.6 B parameters)."""
        if self._model is None:
            torch.manual_seed(0)
            folder = tempfile.mkdtemp(dir=self.workdir)  # the tiny tokenizer and config it starts from
            self._model, self.tokenizer = build_ours(self.settings.size, DTYPE, self.device, folder)
        return self._model

    def free_model(self):
        self._model = None
        release(self.device)

    @property
    def pad_token_id(self):
        if self.tokenizer is None:
            self.model()
        return self.tokenizer.pad_token_id

    def processor(self, hd_num):
        if hd_num not in self._processors:
            self._processors[hd_num] = self.model().build_processor(self.tokenizer, hd_num)
        return self._processors[hd_num]

    def prepare(self, case, batch=1):
        """The processor's inputs for `batch` copies of the query about the case's image, on the device."""
        hd_num = CASES[case][2]
        processor = self.processor(hd_num)
        prompts = [processor.build_prompt(QUERY)] * batch
        inputs = processor(prompts, images=[[case_image(case)]] * batch, hd_num=hd_num).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(DTYPE)
        return inputs

    def request(self, case=None, batch=1):
        key = (case or self.settings.case, batch)
        if key not in self._requests:
            self._requests[key] = self.prepare(*key)
        return self._requests[key]

    def forget_batched_requests(self):
        self._requests = {key: inputs for key, inputs in self._requests.items() if key[1] == 1}

    def reference(self):
        """Our bf16 model on the request: greedy ids, the teacher-forced logits behind them, and the peak memory."""
        if self._reference is None:
            model, inputs = self.model(), self.request()
            ids, peak = with_peak(self.device, lambda: greedy(model, inputs, self.settings.decode_steps,
                                                              self.pad_token_id))  # fmt: skip
            logits = next_token_logits(model, inputs, ids).float()
            self._reference = {"ids": ids.cpu(), "logits": logits, "peak_bytes": peak}
        return self._reference

    def checkpoint(self):
        """Our bf16 model saved as safetensors with our code beside it, as a user's downloaded folder."""
        if self._checkpoint is None:
            folder = self.workdir / "checkpoint"
            folder.mkdir()
            for path in ROOT.glob("*.py"):
                shutil.copy(path, folder / path.name)
            self.model().save_pretrained(folder)
            self._checkpoint = folder
        return self._checkpoint

    def agreement(self, model):
        """`model` against the bf16 reference on the request (see the module docstring)."""
        reference, inputs = self.reference(), self.request()
        logits = next_token_logits(model, inputs, reference["ids"])
        dtype, logits = str(logits.dtype), logits.float()
        ids = greedy(model, inputs, self.settings.decode_steps, self.pad_token_id).cpu()
        differences = (ids != reference["ids"]).any(dim=0).nonzero()
        return {
            "steps": self.settings.decode_steps,
            "logits_dtype": dtype,
            "logits_finite": bool(torch.isfinite(logits).all()),
            "logits_max_abs_diff": (logits - reference["logits"]).abs().max().item(),
            "logits_relative_diff": ((logits - reference["logits"]).norm() / reference["logits"].norm()).item(),
            "top1_agreement": (logits.argmax(-1) == reference["ids"]).float().mean().item(),
            "greedy_agreement": (ids == reference["ids"]).float().mean().item(),
            "first_greedy_difference": differences[0].item() if len(differences) else None,
        }


# ---- the parts ----


def selected_test_files():
    """The test files that mention CUDA, except this check's own tests, which would run the check again."""
    files = sorted((ROOT / "tests").glob("test_*.py"))
    return [path for path in files if "cuda" in path.read_text() and path.name != "test_gpu_check.py"]


def pytest_collection_modifyitems(config, items):
    """pytest hook, active when this file is loaded as a plugin (`pytest -p gpu_check`, part 1): keep only the
    tests that run on CUDA."""

    def runs_on_cuda(item):
        reasons = " ".join(str(mark.kwargs.get("reason", "")) for mark in item.iter_markers() if "skip" in mark.name)
        return bool(CUDA_REASON.search(reasons) or BITSANDBYTES_TESTS.search(item.name))

    kept = [item for item in items if runs_on_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if not runs_on_cuda(item)])
    items[:] = kept


def part_cuda_tests(check, result):
    junit = check.workdir / "cuda_tests.xml"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "gpu_check", f"--junitxml={junit}",
               *map(str, selected_test_files())]  # fmt: skip
    try:
        completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath},
                                   capture_output=True, text=True, timeout=check.time_left_in_part() - 1)  # fmt: skip
    except subprocess.TimeoutExpired as error:  # its output is bytes whatever `text` says
        output = [part if isinstance(part, bytes) else part.encode() for part in (error.stdout, error.stderr) if part]
        (check.out / "cuda_tests.log").write_bytes(b"".join(output))
        raise
    (check.out / "cuda_tests.log").write_text(completed.stdout + completed.stderr)
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    outcomes = {}
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    counts = Counter(outcomes.values())
    result.update(returncode=completed.returncode, selected=len(outcomes), passed=counts["passed"],
                  failed=counts["failure"] + counts["error"], skipped=counts["skipped"], outcomes=outcomes)  # fmt: skip


@torch.no_grad()
def part_ttft(check, result):
    model, settings = check.model(), check.settings
    inputs = check.request()
    result.update(case=settings.case, hd_num=CASES[settings.case][2], tokens=inputs["input_ids"].shape[1],
                  weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))  # fmt: skip
    features = torch.cat(model.get_image_features(inputs["pixel_values"], inputs["image_grids"]))
    image_mask = inputs["input_ids"] == model.config.image_token_id
    embeds = model.get_input_embeddings()(inputs["input_ids"]).masked_scatter(image_mask[..., None], features)
    steps = {
        "ttft": lambda: greedy(model, check.prepare(settings.case), 1, check.pad_token_id),
        "preprocess": lambda: check.prepare(settings.case),
        "vision": lambda: model.get_image_features(inputs["pixel_values"], inputs["image_grids"]),
        "prefill": lambda: model(inputs_embeds=embeds, image_mask=image_mask, attention_mask=inputs["attention_mask"],
                                 use_cache=True, logits_to_keep=1),
    }  # fmt: skip
    seconds = median_seconds([synchronized(step, check.device) for step in steps.values()], 1 + 2 * settings.repeats)
    result.update({f"{name}_s": value for name, value in zip(steps, seconds)})
    result["peak_bytes"] = check.reference()["peak_bytes"]


def part_decode(check, result):
    settings, ours = check.settings, check.model()
    llama = build_llama({name: getattr(ours.config, name) for name in LLM_DIMS}, DTYPE, check.device)
    bandwidth = copy_bandwidth(check.device, 5)
    weights = {"ours": decode_weight_bytes(ours), "llama": decode_weight_bytes(llama)}
    bound = {name: bandwidth / size for name, size in weights.items()}
    rows = []
    result.update(prompt_tokens=check.request()["input_ids"].shape[1], decode_steps=settings.decode_steps,
                  copy_bandwidth_bytes_per_s=bandwidth, weight_bytes=weights, bound_tokens_per_s=bound, rows=rows)  # fmt: skip
    try:
        for batch in settings.batch_sizes:
            ours_inputs = check.request(batch=batch)
            text_ids = torch.randint(3, ours.config.vocab_size, ours_inputs["input_ids"].shape, device=check.device)
            llama_inputs = {"input_ids": text_ids, "attention_mask": torch.ones_like(text_ids)}
            for cache in CACHES:
                left = check.time_left_in_part()
                if left < settings.min_start_s * (4 if cache == "compiled" else 1):
                    rows.append({"batch": batch, "cache": cache, "skipped": f"time budget ({left:.0f} s left)"})
                    continue
                try:
                    speeds = {
                        name: decode_speed(model, inputs, settings.decode_steps, cache, check.pad_token_id,
                                           settings.repeats)
                        for name, model, inputs in (("ours", ours, ours_inputs), ("llama", llama, llama_inputs))
                    }  # fmt: skip
                except Exception as error:  # e.g. a graph break under compile: the other rows still run
                    rows.append({"batch": batch, "cache": cache, "error": f"{type(error).__name__}: {error}"[:1000]})
                    continue
                rows.append({"batch": batch, "cache": cache, **speeds, "ratio": speeds["ours"] / speeds["llama"],
                             "share_of_bound": speeds["ours"] / bound["ours"],
                             "compiled": cache == "compiled" and hasattr(ours, "_compiled_call")})  # fmt: skip
    finally:
        del llama
        # What generate left on the model: the compiled forward and, in transformers 4, the last static cache.
        for name in ("_compiled_call", "_cache"):
            vars(ours).pop(name, None)
        check.forget_batched_requests()  # their pixels would count in the later parts' peak memory
        torch._dynamo.reset()  # the compiled graphs hold the models' weights


def part_bf16_vs_fp32(check, result):
    fp32 = copy.deepcopy(check.model()).float()
    result.update(matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, **check.agreement(fp32))


def part_fp16_autocast(check, result):
    """bf16 weights under fp16 autocast, as the model card ran them: the raw image to the last greedy token, then
    the agreement with plain bf16 under the same autocast. CPU autocast has no fp32 LayerNorm for the CLIP tower's
    bf16 weights, so the dry run takes fp32 weights, as the README advises for CPU."""
    model, settings = check.model(), check.settings
    check.reference()
    if check.device.type == "cpu":
        model = copy.deepcopy(model).float()
    result["weights_dtype"] = str(model.dtype)
    with torch.autocast(check.device.type, dtype=torch.float16):
        start = time.perf_counter()
        ids = greedy(model, check.prepare(settings.case), settings.decode_steps, check.pad_token_id)
        result.update(end_to_end_s=time.perf_counter() - start, new_tokens=ids.shape[1])
        result.update(check.agreement(model))


def part_quantized(check, result):
    try:
        result["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise SkipPart("bitsandbytes is not installed (bench/results/README.md says how to bring it)") from None
    inputs, folder = check.request(), check.checkpoint()
    check.reference()
    check.free_model()  # measure the quantised model alone
    configs = {
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE),
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
    }
    for name, quantization in configs.items():
        result[name] = numbers = {}
        try:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=DTYPE,
                                                         quantization_config=quantization,
                                                         device_map=str(check.device)).eval()  # fmt: skip
            numbers.update(load_s=time.perf_counter() - start,
                           quantized_linears=type(model.model.layers[0].attention.wqkv).__name__)  # fmt: skip
            if check.device.type == "cuda":
                numbers["resident_bytes"] = torch.cuda.memory_allocated(check.device)
            _, numbers["request_peak_bytes"] = with_peak(
                check.device, lambda: greedy(model, inputs, check.settings.decode_steps, check.pad_token_id)
            )
            numbers.update(check.agreement(model))
        except Exception as error:  # one precision failing must not hide the other
            numbers["error"] = f"{type(error).__name__}: {error}"
        model = None
        release(check.device)


def part_lora_step(check, result):
    """One optimiser step of the official LoRA recipe (scripts/finetune.py) on an image prompt followed by answer
    text up to `lora_tokens`, only the answer labelled; the first step is a warm-up."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from finetune import ModelArguments, select_trainable

    settings = check.settings
    prompt = check.request(settings.lora_case)
    model = check.model()
    num_answer = settings.lora_tokens - prompt["input_ids"].shape[1]
    answer_ids = check.tokenizer(ANSWER * num_answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if not 0 < num_answer <= answer_ids.shape[1]:
        raise ValueError(f"The {settings.lora_case} prompt has {prompt['input_ids'].shape[1]} ids, which leaves "
                         f"{num_answer} of lora_tokens={settings.lora_tokens} for the answer; raise lora_tokens.")  # fmt: skip
    answer_ids = answer_ids[:, :num_answer].to(check.device)
    input_ids = torch.cat([prompt["input_ids"], answer_ids], dim=1)  # (1, lora_tokens)
    labels = torch.cat([torch.full_like(prompt["input_ids"], -100), answer_ids], dim=1)
    sample = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
              "pixel_values": prompt["pixel_values"], "image_grids": prompt["image_grids"]}  # fmt: skip
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model = select_trainable(model, ModelArguments(model_name_or_path="", use_lora=True), checkpointing=True)
    check.free_model()  # the adapters changed it: this part owns it now
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    result.update(case=settings.lora_case, tokens=input_ids.shape[1], labelled_tokens=answer_ids.shape[1],
                  trainable_parameters=sum(p.numel() for p in trainable), losses=[], grad_norms=[])  # fmt: skip

    def step():
        loss = model(**sample).loss
        loss.backward()
        norms = [p.grad.float().norm() for p in trainable if p.grad is not None]
        result["grad_norms"].append(torch.stack(norms).norm().item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["losses"].append(loss.item())

    (result["step_s"],) = median_seconds([synchronized(step, check.device)], settings.repeats)  # warm-up: Adam state
    _, result["peak_bytes"] = with_peak(check.device, step)


def part_device_map(check, result):
    reference, inputs, folder = check.reference(), check.request(), check.checkpoint()
    check.free_model()
    weights = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    if check.device.type == "cuda":
        max_memory = {check.device.index or 0: weights // 2, "cpu": 4 * weights}
    else:  # no second device kind on a CPU machine: split between the CPU and the disk instead
        max_memory = {"cpu": weights // 2}
    result["max_memory"] = {str(device): size for device, size in max_memory.items()}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=DTYPE, device_map="auto",
                                                 max_memory=max_memory,
                                                 offload_folder=check.workdir / "offload").eval()  # fmt: skip
    result["placement"] = dict(Counter(str(device) for device in model.hf_device_map.values()))
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    logits = next_token_logits(model, inputs, reference["ids"]).float()
    result["logits_max_abs_diff"] = (logits - reference["logits"]).abs().max().item()
    steps = check.settings.device_map_steps
    ids = greedy(model, inputs, steps, check.pad_token_id).cpu()
    result.update(same_greedy_ids=torch.equal(ids, reference["ids"][:, :steps]), greedy_steps=steps)


PARTS = {
    "1_cuda_tests": part_cuda_tests,
    "2_ttft": part_ttft,
    "3_decode": part_decode,
    "4_bf16_vs_fp32": part_bf16_vs_fp32,
    "5_fp16_autocast": part_fp16_autocast,
    "6_quantized": part_quantized,
    "7_lora_step": part_lora_step,
    "8_device_map": part_device_map,
}


def run_part(check, name, result):
    """One part, guarded: `result` gets its numbers and status "ok", or why it failed, was skipped or stopped, with
    the numbers it had by then. The alarm is set to the budget's end or the part's cap, whichever comes first."""
    left = check.time_left()
    if left < max(check.settings.min_start_s, 1):
        result.update(status="skipped", reason=f"time budget ({left:.0f} s left)")
        return
    start = time.monotonic()
    check.start_part(check.settings.part_caps_s.get(name))
    try:
        PARTS[name](check, result)
        result["status"] = "ok"
    except (OutOfTime, subprocess.TimeoutExpired):
        limit = "the time budget" if check.time_left() < 1 else f"its {check.part_cap_s:.0f} s cap"
        result.update(status="stopped", reason=f"it ran past {limit}")
    except SkipPart as reason:
        result.update(status="skipped", reason=str(reason))
    except Exception as error:
        result.update(status="failed", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()[-4000:])  # fmt: skip
    finally:
        check.start_part(None)
    result["seconds"] = time.monotonic() - start
    release(check.device)


def environment(settings):
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = settings.device == "cuda"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": version("accelerate"),
        "peft": version("peft"),
        "bitsandbytes": version("bitsandbytes"),
    }


def write_report(report, out):
    """The JSON and the Markdown table, rewritten after every part so a killed run still leaves its numbers."""
    report["elapsed_s"] = time.monotonic() - START
    report["targets"] = evaluate_targets(report)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(render(report))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths in seconds")
    parser.add_argument("--budget", type=float, help="seconds from start to stop by (default 450, dry run 540)")
    parser.add_argument("--parts", nargs="+", choices=[name[0] for name in PARTS], help="run only these parts")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("give --out DIR (or set $OUT)")
    settings = DRY if args.dry_run else REAL
    if args.budget:
        settings = Settings(**{**asdict(settings), "budget_s": args.budget})
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run for the CPU check")
    args.out.mkdir(parents=True, exist_ok=True)

    def out_of_time(signum, frame):
        raise OutOfTime

    report = {**environment(settings), "dry_run": args.dry_run, "budget_s": settings.budget_s,
              "settings": asdict(settings), "parts": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        check = Check(settings, Path(workdir), args.out)
        selected = [name for name in PARTS if args.parts is None or name[0] in args.parts]
        signal.signal(signal.SIGALRM, out_of_time)
        try:
            check.start_part(None)
            for name in selected:
                report["parts"][name] = {"status": "running"}
                run_part(check, name, report["parts"][name])
                write_report(report, args.out)
        except OutOfTime:  # outside a part's guard; the part still running, if any, is marked stopped
            pass
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    for name in selected:
        part = report["parts"].setdefault(name, {"status": "skipped", "reason": "time budget"})
        if part["status"] == "running":
            part.update(status="stopped", reason="it ran past the time budget")
    write_report(report, args.out)
    sys.stdout.write(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
