"""Processor for InternLM-XComposer2-4KHD: the chat prompt, `<ImageHere>` expansion into placeholder ids with the
published BOS-per-segment rule, and left-padded batches, on top of the tokenizer and the image processor.
"""

import json

import numpy as np
import transformers
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_4khd import (
    image_token_budget,
    num_image_tokens,
    to_pil_image,
    tokens_per_side,
    validate_hd_num,
)

IMAGE_TOKEN = "<ImageHere>"
# Turn markers of the chat format: ordinary pieces of the InternLM2 vocabulary (SPEC section 6).
TURN_START = "[UNUSED_TOKEN_146]"
TURN_END = "[UNUSED_TOKEN_145]"
DEFAULT_SYSTEM = "\n".join(
    [
        "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).",
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
        "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.",
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
        "such as English and 中文.",
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
        "the provided image.",
    ]
)


def _jinja_string(value: str) -> str:
    # A JSON string is a valid Jinja string literal, with newlines and quotes escaped.
    return json.dumps(value, ensure_ascii=False)


# The one definition of the chat format (SPEC section 6); `build_prompt` renders it too. Without a system message the
# default system text is used, as the original chat() does; a system message with empty content means no system turn.
CHAT_TEMPLATE = (
    "{%- set image_token = " + _jinja_string(IMAGE_TOKEN) + " -%}"
    "{%- set turn_start = " + _jinja_string(TURN_START) + " -%}"
    "{%- set turn_end = " + _jinja_string(TURN_END) + " -%}"
    "{%- set default_system = " + _jinja_string(DEFAULT_SYSTEM) + " -%}"
    """
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}
                {{- image_token -}}
            {%- elif item['type'] == 'text' -%}
                {{- item['text'] -}}
            {%- else -%}
                {{- raise_exception('Only image and text content is supported, got ' + item['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = render(messages[0]['content']) -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if system -%}
    {{- turn_start + 'system\\n' + system + turn_end + '\\n' -}}
{%- endif -%}
{%- for message in turns -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception('After the system message, roles must be user or assistant, not ' + message['role']) -}}
    {%- endif -%}
    {{- turn_start + message['role'] + '\\n' + render(message['content']) + turn_end + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- turn_start + 'assistant\\n' -}}
{%- endif -%}
"""
)


class InternLMXComposer2Processor(ProcessorMixin):
    r"""Turns chat prompts and images into the inputs of `InternLMXComposer2ForCausalLM`.

    Each prompt is split at `<ImageHere>`; every non-empty text segment is tokenised on its own with BOS (the
    published rule, so the ids match the original exactly), and each `<ImageHere>` becomes as many `image_token_id`
    copies as the image costs (`num_image_tokens` of the grid the image processor returns for it).

    Args:
        image_processor (`InternLMXComposer2ImageProcessor`):
            The 4KHD image processor.
        tokenizer (`InternLM2Tokenizer`):
            The InternLM2 tokenizer.
        image_token_id (`int`):
            The placeholder id of image positions, the model config's `image_token_id` (92537 for the 7B model).
        chat_template (`str`, *optional*):
            Jinja chat template; defaults to `CHAT_TEMPLATE`, the published chat format.
    """

    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4 finds the sub-processors through these; 5 reads the __init__ signature and warns about them.
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, image_token_id=None, chat_template=None, **kwargs):
        if image_token_id is None:
            raise ValueError(
                "InternLMXComposer2Processor needs image_token_id, the model config's image_token_id (92537 for the "
                "published 7B model); add it to processor_config.json or pass it to from_pretrained."
            )
        if tokenizer is not None and (
            not 0 <= image_token_id < tokenizer.vocab_size or image_token_id in tokenizer.all_special_ids
        ):
            raise ValueError(
                f"image_token_id={image_token_id} is not an ordinary id of the tokenizer's vocabulary (size "
                f"{tokenizer.vocab_size}, special ids {tokenizer.all_special_ids}); use the model config's "
                "image_token_id."
            )
        self.image_token = IMAGE_TOKEN
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def build_prompt(self, query: str, history=(), meta_instruction: str | None = DEFAULT_SYSTEM) -> str:
        """The chat prompt string of the original `chat()` (SPEC section 6), rendered with the chat template.

        Args:
            query (`str`):
                The user's message; write `<ImageHere>` where an image goes (the model card puts it first).
            history (sequence of `(str, str)`, *optional*):
                Earlier `(query, reply)` pairs, oldest first.
            meta_instruction (`str`, *optional*, defaults to `DEFAULT_SYSTEM`):
                The system text; empty or `None` leaves out the system turn.

        Returns:
            `str`: the optional system turn, a user and an assistant turn per history pair, the user turn of `query`,
            then `"[UNUSED_TOKEN_146]assistant\\n"`.
        """
        messages = [{"role": "system", "content": meta_instruction or ""}]
        for past_query, past_reply in history:
            messages += [{"role": "user", "content": past_query}, {"role": "assistant", "content": past_reply}]
        messages.append({"role": "user", "content": query})
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def __call__(
        self,
        text,
        images=None,
        hd_num: int | None = None,
        return_tensors: str = "pt",
        padding_side: str = "left",
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise formatted prompts, expand `<ImageHere>` into placeholder ids and pad the batch.

        A prompt without images starts with two BOS ids, as in the original text-only chat (it put a literal `<s>`
        in front of the prompt and tokenised with BOS); this is the only place that rule lives.

        Args:
            text (`str` or `list[str]`):
                One formatted prompt (see `build_prompt`, `apply_chat_template`) or a batch of them.
            images (*optional*):
                `None`; one image; a flat list of images, in the order of the `<ImageHere>` of the whole batch; or one
                list of images per prompt. An image is anything the image processor accepts. When a prompt has images
                but no `<ImageHere>`, its images go at the start of its (last) user turn.
            hd_num (`int`, *optional*):
                Maximum number of crops per image; defaults to the image processor's `hd_num`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` or `"np"`.
            padding_side (`str`, *optional*, defaults to `"left"`):
                Where to pad shorter prompts, `"left"` for generation or `"right"`.
            max_length (`int`, *optional*):
                Longest allowed prompt in ids; a longer one raises a `ValueError` naming the largest `hd_num` that
                would fit. Never truncates.
            kwargs:
                Only `None` values are accepted (e.g. `videos=None` from `apply_chat_template(tokenize=True)`).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask`, int64 `(B, L)`, and when images are given
            `pixel_values` `(T, 3, S, S)` and `image_grids` `(N, 2)` from the image processor.

        Raises:
            `ValueError`: if the number of `<ImageHere>` and of images disagree, if the text contains the reserved
            image piece, if a prompt is longer than `max_length`, or on an unsupported option.
        """
        unexpected = sorted(key for key, value in kwargs.items() if value is not None)
        if unexpected:
            raise ValueError(f"Unexpected arguments {unexpected}; the processor takes text, images and hd_num.")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if hd_num is not None:
            hd_num = validate_hd_num(hd_num)  # also for text-only calls, so a bad value never passes silently
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("text must be a prompt string or a non-empty list of prompt strings.")

        images_per_prompt = self._images_per_prompt(prompts, images)
        prompts = [self._place_images(prompt, len(own)) for prompt, own in zip(prompts, images_per_prompt)]
        flat_images = [to_pil_image(image) for own in images_per_prompt for image in own]

        data = {}
        image_lengths = []
        if flat_images:
            data = dict(self.image_processor(flat_images, hd_num=hd_num, return_tensors=return_tensors))
            side = tokens_per_side(self.image_processor.image_size, self.image_processor.patch_size)
            image_lengths = [num_image_tokens(rows, cols, side) for rows, cols in data["image_grids"].tolist()]

        rows, start = [], 0
        for prompt in prompts:
            num_images = prompt.count(IMAGE_TOKEN)
            rows.append(self._prompt_ids(prompt, image_lengths[start : start + num_images]))
            if max_length is not None and len(rows[-1]) > max_length:
                own = slice(start, start + num_images)
                raise ValueError(self._too_long(len(rows[-1]), max_length, image_lengths[own], flat_images[own], hd_num))
            start += num_images
        data.update(self._pad(rows, padding_side))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _too_long(self, length, max_length, image_lengths, images, hd_num):
        """The error message for a prompt of `length` ids > `max_length`, with the largest hd_num that fits."""
        message = f"The prompt is {length} ids long, more than max_length={max_length}"
        if not images:
            return message + "; shorten the text."
        hd_num = self.image_processor.hd_num if hd_num is None else hd_num
        text_length = length - sum(image_lengths)
        size = (self.image_processor.image_size, self.image_processor.patch_size)
        for smaller in range(hd_num - 1, 0, -1):
            needed = text_length + sum(image_token_budget(*image.size, smaller, *size)[2] for image in images)
            if needed <= max_length:
                return message + f" (its {len(images)} image(s) take {sum(image_lengths)}); hd_num={smaller} fits."
        return message + "; even hd_num=1 does not fit: shorten the text or pass fewer images."

    def _images_per_prompt(self, prompts: list[str], images) -> list[list]:
        """Assign the given images to the prompts: one list per prompt, checked against its `<ImageHere>` count."""
        counts = [prompt.count(IMAGE_TOKEN) for prompt in prompts]
        if images is None:
            images = [[] for _ in prompts]
        elif not isinstance(images, (list, tuple)):
            images = [[images]]
        elif images and all(isinstance(own, (list, tuple)) for own in images):
            images = [list(own) for own in images]
        elif len(prompts) == 1:
            images = [list(images)]
        elif len(images) == sum(counts):
            # A flat list for a batch: images follow the <ImageHere> order across the prompts.
            offsets = np.cumsum([0] + counts).tolist()
            images = [list(images[offsets[i] : offsets[i + 1]]) for i in range(len(prompts))]
        else:
            raise ValueError(
                f"The prompts contain {sum(counts)} {IMAGE_TOKEN} but {len(images)} images were given; pass one "
                "image per placeholder, or one list of images per prompt."
            )
        if len(images) != len(prompts):
            raise ValueError(
                f"Got {len(images)} lists of images for {len(prompts)} prompts; pass one list per prompt (it may be "
                "empty)."
            )
        for index, (count, own) in enumerate(zip(counts, images)):
            if count != len(own) and not (count == 0 and own):
                raise ValueError(
                    f"Prompt {index} contains {count} {IMAGE_TOKEN} but {len(own)} images were given for it; write "
                    f"one {IMAGE_TOKEN} per image (or none, to put all its images at the start of the query)."
                )
        return images

    @staticmethod
    def _place_images(prompt: str, num_images: int) -> str:
        """Put `num_images` placeholders at the start of the last user turn when the prompt has none.

        The model card always writes `<ImageHere>` first in the query; the original family was inconsistent here
        (SPEC section 6), so this is our documented choice.
        """
        if num_images == 0 or IMAGE_TOKEN in prompt:
            return prompt
        user_turn = TURN_START + "user\n"
        cut = prompt.rfind(user_turn)
        cut = 0 if cut < 0 else cut + len(user_turn)
        return prompt[:cut] + IMAGE_TOKEN * num_images + prompt[cut:]

    def _prompt_ids(self, prompt: str, image_lengths: list[int], bos_per_segment: bool = True) -> list[int]:
        """Ids of one prompt: the text segments between `<ImageHere>` tokenised one by one, each image as its run of
        placeholder ids. BOS goes before every non-empty segment (the chat rule) or, with `bos_per_segment=False`,
        before the first one only (the training rule, SPEC section 7)."""
        segments = prompt.split(IMAGE_TOKEN)
        texts = [segment for segment in segments if segment]
        text_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        ids, need_bos = [], True
        for index, segment in enumerate(segments):
            if segment:
                segment_ids = next(text_ids)
                if self.image_token_id in segment_ids:
                    piece = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
                    raise ValueError(
                        f"The text contains {piece!r}, the piece reserved for image positions (id "
                        f"{self.image_token_id}). Remove it from the text; write {IMAGE_TOKEN} where an image goes."
                    )
                ids += [self.tokenizer.bos_token_id] * need_bos + segment_ids
                need_bos = bos_per_segment
            if index < len(image_lengths):
                ids += [self.image_token_id] * image_lengths[index]
        if not image_lengths and bos_per_segment:
            # The original text-only chat tokenised "<s>" + prompt with BOS: two BOS ids (SPEC section 6).
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    # ---- Training examples (SPEC section 7) ----

    def training_text(self, messages) -> str:
        """The training text of a conversation: its user and assistant turns in the chat format, no system turn.

        Args:
            messages (`list[dict]`): `{"role": "user" | "assistant", "content": str}` turns, in order; contents are
                stripped, as the official fine-tuning code does.
        """
        for index, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant") or not isinstance(message.get("content"), str):
                raise ValueError(
                    f"Turn {index} of the conversation is {message!r}; every turn needs a role 'user' or "
                    "'assistant' and a string content."
                )
        turns = [{"role": message["role"], "content": message["content"].strip()} for message in messages]
        return self.apply_chat_template([{"role": "system", "content": ""}] + turns, add_generation_prompt=False)

    def training_example(self, messages, images=(), hd_num: int | None = None, max_length: int | None = None):
        """Input ids and labels of one training conversation, the way the official fine-tuning builds them.

        The text is `training_text(messages)` followed by EOS; BOS comes only at the very start; each `<ImageHere>`
        becomes the image's placeholder run. Labels are `mask_human_turns` of the ids with image positions set to
        -100, so the loss covers the assistant turns (their turn-end marker included) and the final EOS.

        Args:
            messages (`list[dict]`): the turns, see `training_text`.
            images (sequence, *optional*): one image (anything the image processor accepts) per `<ImageHere>`.
            hd_num (`int`, *optional*): maximum crops per image; defaults to the image processor's.
            max_length (`int`, *optional*): longest allowed example; a longer one raises (never truncated).

        Returns:
            `BatchFeature` with 1-D `input_ids` and `labels` tensors, and `pixel_values` and `image_grids` when there
            are images.

        Raises:
            `ValueError`: if the number of `<ImageHere>` and of images differ, or the example is longer than
            `max_length`.
        """
        text = self.training_text(messages)
        hd_num = validate_hd_num(self.image_processor.hd_num if hd_num is None else hd_num)
        images = [to_pil_image(image) for image in images]
        self._check_image_count(text, len(images))
        data, image_lengths = {}, []
        if images:
            data = dict(self.image_processor(images, hd_num=hd_num, return_tensors="pt"))
            side = tokens_per_side(self.image_processor.image_size, self.image_processor.patch_size)
            image_lengths = [num_image_tokens(rows, cols, side) for rows, cols in data["image_grids"].tolist()]
        ids = self._prompt_ids(text, image_lengths, bos_per_segment=False) + [self.tokenizer.eos_token_id]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(self._too_long(len(ids), max_length, image_lengths, images, hd_num))
        labels = np.array(self.mask_human_turns(ids))
        labels[np.array(ids) == self.image_token_id] = -100
        data.update(input_ids=np.array(ids, dtype=np.int64), labels=labels.astype(np.int64))
        return BatchFeature(data=data, tensor_type="pt")

    def training_length(self, messages, image_sizes=(), hd_num: int | None = None) -> int:
        """Length in ids of `training_example(messages, images, hd_num)` from the images' `(width, height)` alone,
        without decoding pixels: what a dataset needs to drop over-long examples before training."""
        text = self.training_text(messages)
        self._check_image_count(text, len(image_sizes))
        hd_num = validate_hd_num(self.image_processor.hd_num if hd_num is None else hd_num)
        size = (self.image_processor.image_size, self.image_processor.patch_size)
        image_lengths = [image_token_budget(width, height, hd_num, *size)[2] for width, height in image_sizes]
        return len(self._prompt_ids(text, image_lengths, bos_per_segment=False)) + 1

    @staticmethod
    def _check_image_count(text: str, num_images: int):
        if text.count(IMAGE_TOKEN) != num_images:
            raise ValueError(
                f"The conversation contains {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {num_images} images were "
                f"given; a training example needs exactly one {IMAGE_TOKEN} per image."
            )

    def mask_human_turns(self, ids: list[int]) -> list[int]:
        """Labels of the official fine-tuning (SPEC section 7) for ids laid out by `training_example`.

        Scanning the turn-end markers: one that closes a user turn masks everything from the end of the previous
        answer through itself and the assistant header after it; one that closes an answer records where the answer
        ended. The first EOS is trained and everything after it is masked. Ids cut off inside a question (no EOS,
        even marker count) are masked from one past the last answer's marker on. Images are not masked here.
        """
        turn_end_id = self.tokenizer.convert_tokens_to_ids(TURN_END)
        labels = list(ids)
        ends, answer_end = 0, 0
        for index, token in enumerate(ids):
            if token == turn_end_id:
                if ends % 2 == 0:
                    stop = min(index + 1 + self._assistant_header_length, len(ids))
                    labels[answer_end:stop] = [-100] * (stop - answer_end)
                else:
                    answer_end = index + 1
                ends += 1
            elif token == self.tokenizer.eos_token_id:
                labels[index + 1 :] = [-100] * (len(ids) - index - 1)
                return labels
        if ends % 2 == 0:
            labels[answer_end + 1 :] = [-100] * max(len(ids) - answer_end - 1, 0)
        return labels

    @property
    def _assistant_header_length(self) -> int:
        """Ids between a user turn's end marker and the first id of the answer: `"\n" + TURN_START + "assistant\n"`
        tokenised in context (5 in the published vocabulary), so the rule holds for any tokenizer."""
        ids = self.tokenizer(TURN_END + "\n" + TURN_START + "assistant\n", add_special_tokens=False)["input_ids"]
        return len(ids) - 1 - ids.index(self.tokenizer.convert_tokens_to_ids(TURN_END))

    def _pad(self, rows: list[list[int]], padding_side: str) -> dict[str, np.ndarray]:
        """Pad id rows to one length with the tokenizer's pad id; the mask is 0 exactly on the pads."""
        length = max(len(row) for row in rows)
        input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[index, span] = row
            attention_mask[index, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def postprocess(self, text):
        """Cut a decoded reply at the first turn-end marker, as the original `chat()` does.

        Args:
            text (`str` or `list[str]`): Decoded reply or replies (`batch_decode(..., skip_special_tokens=True)`).

        Returns:
            `str` or `list[str]`: The reply text before the first `[UNUSED_TOKEN_145]`.
        """
        if isinstance(text, str):
            return text.split(TURN_END)[0]
        return [reply.split(TURN_END)[0] for reply in text]
