"""Processor for InternLM-XComposer2-4KHD: the chat prompt, `<ImageHere>` expansion into placeholder ids with the
published BOS-per-segment rule, and left-padded batches, on top of the tokenizer and the image processor.
"""

import json

import numpy as np
import transformers
from transformers import BatchFeature, PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from .image_processing_4khd import image_token_budget, to_pil_image, validate_hd_num

IMAGE_TOKEN = "<ImageHere>"
# Turn markers of the chat format: ordinary pieces of the InternLM2 vocabulary (docs/model.md section 6).
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


# The one definition of the chat format (docs/model.md section 6); `build_prompt` renders it too, and
# `chat_template.jinja` is this text (`make chat-template` writes it; a test checks they match). Without a system
# message the default system text is used, as the original chat() does; a system message with empty content means no
# system turn. Assistant content and its turn-end marker sit in `{% generation %}` markers, for
# `return_assistant_tokens_mask` (TRL's `assistant_only_loss`); image items render as `<ImageHere>`, which only the
# processor turns into image ids.
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
    {{- turn_start + message['role'] + '\\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- render(message['content']) + turn_end -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- render(message['content']) + turn_end -}}
    {%- endif -%}
    {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- turn_start + 'assistant\\n' -}}
{%- endif -%}
"""
)


def check_text(text, name: str):
    """Check that `text` (the argument called `name`) is a `str` that is valid Unicode.

    Raises:
        `TypeError`: for bytes (with how to decode them) or any other non-string.
        `ValueError`: for a lone surrogate, which no tokenizer can encode.
    """
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(
            f"{name} must be a str, got {type(text).__name__}; decode it first, e.g. with .decode('utf-8')."
        )
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} contains a lone surrogate {text[error.start]!r} at index {error.start}, which is not valid "
            "Unicode text (it comes from bytes decoded with errors='surrogateescape' or a broken JSON escape); decode "
            "the bytes as UTF-8, with errors='replace' to substitute bad bytes."
        ) from None


def check_tokenizer(tokenizer, vocab_size: int | None = None):
    """Check that `tokenizer` is an InternLM2 tokenizer (for a model of `vocab_size` ids), naming what to pass instead.

    Raises:
        `TypeError`: for a processor passed as the tokenizer, or an object that is no tokenizer.
        `ValueError`: for a tokenizer without the chat format's turn markers, BOS or EOS, or of another vocabulary size.
    """
    load = "load the model's own with AutoTokenizer.from_pretrained(model_folder, trust_remote_code=True)"
    if isinstance(tokenizer, ProcessorMixin) or hasattr(tokenizer, "image_processor"):
        raise TypeError(
            f"Got a processor ({type(tokenizer).__name__}) where the tokenizer goes; pass processor.tokenizer."
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be the model's InternLM2 tokenizer, got {type(tokenizer).__name__}; {load}.")
    not_pieces = {None, tokenizer.unk_token_id, *tokenizer.all_special_ids}
    missing = [piece for piece in (TURN_START, TURN_END) if tokenizer.convert_tokens_to_ids(piece) in not_pieces]
    missing += [name for name in ("bos", "eos") if getattr(tokenizer, f"{name}_token_id") is None]
    if missing:
        raise ValueError(
            f"{type(tokenizer).__name__} is not an InternLM2 tokenizer: it lacks {', '.join(missing)}, which the chat "
            f"format needs; {load}."
        )
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the model has {vocab_size} (config.vocab_size), so it "
            f"belongs to another model; {load}."
        )


def _is_text(value) -> bool:
    """A prompt string or a non-empty list of them (what `text` holds, and `images` never does)."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(item, str) for item in value)


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
        if tokenizer is not None:
            check_tokenizer(tokenizer)
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
        """The chat prompt string of the original `chat()` (docs/model.md section 6), rendered with the chat template.

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

    def __call__(self, text=None, images=None, **kwargs) -> BatchFeature:
        """Tokenise formatted prompts, expand `<ImageHere>` into placeholder ids and pad the batch.

        A prompt without images starts with two BOS ids, as in the original text-only chat (it put a literal `<s>`
        in front of the prompt and tokenised with BOS); this is the only place that rule lives.

        Args:
            text (`str` or `list[str]`):
                One formatted prompt (see `build_prompt`, `apply_chat_template`) or a batch of them. The native order
                `processor(images, text)` is accepted too.
            images (*optional*):
                `None`; one image; a flat list of images, in the order of the `<ImageHere>` of the whole batch; or one
                list of images per prompt. An image is anything the image processor accepts. When a prompt has images
                but no `<ImageHere>`, its images go at the start of its (last) user turn.
            hd_num (`int`, *optional*):
                Maximum number of crops per image; defaults to the image processor's `hd_num`.
            return_tensors (`str`, *optional*, defaults to `"pt"`):
                `"pt"` or `"np"`.
            padding (`bool` or `str`, *optional*, defaults to `True`):
                `True`/`"longest"` pads to the longest prompt, `"max_length"` to `max_length`; `False`/`"do_not_pad"`
                needs prompts of one length.
            padding_side (`str`, *optional*, defaults to `"left"`):
                Where to pad shorter prompts, `"left"` for generation or `"right"`.
            pad_to_multiple_of (`int`, *optional*):
                Round the padded length up to a multiple of this.
            max_length (`int`, *optional*):
                Longest allowed prompt in ids; a longer one raises a `ValueError` naming the largest `hd_num` that
                would fit. Never truncates: cutting image placeholders would break the image.
            truncation (`bool` or `str`, *optional*, defaults to `False`):
                Accepted for `ProcessorMixin` callers; `True` changes nothing, since a prompt longer than `max_length`
                raises instead of being cut.
            add_special_tokens (`bool`, *optional*, defaults to `True`):
                `False` leaves out every BOS (for text whose template already holds them, as TRL's collators pass).
            return_mm_token_type_ids (`bool`, *optional*, defaults to `False`):
                Also return `mm_token_type_ids` `(B, L)`: 1 at image placeholder positions, 0 elsewhere.
            return_offsets_mapping (`bool`, *optional*, defaults to `False`):
                Also return `offset_mapping` `(B, L, 2)`: each id's character span in its prompt string; image ids,
                BOS and pads are empty spans. Needs the fast tokenizer (what `return_assistant_tokens_mask` uses).
            text_kwargs, images_kwargs, common_kwargs (`dict`, *optional*):
                The grouped form of the arguments above (e.g. `images_kwargs={"hd_num": 16}`).
            kwargs:
                Otherwise only `None` values (e.g. `videos=None` from `apply_chat_template(tokenize=True)`) and
                `return_text_replacement_offsets`, which needs no answer: offsets are already in the prompt's own
                characters.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask`, int64 `(B, L)`, when images are given `pixel_values`
            `(T, 3, S, S)` and `image_grids` `(N, 2)` from the image processor, and the optional outputs above.

        Raises:
            `ValueError`: if the number of `<ImageHere>` and of images disagree, if the text contains the reserved
            image piece, if a prompt is longer than `max_length`, or on an unsupported option.
        """
        if text is not None and not _is_text(text) and _is_text(images):
            text, images = images, text
        for group in ("common_kwargs", "text_kwargs", "images_kwargs"):
            kwargs.update(kwargs.pop(group, None) or {})
        kwargs.pop("return_text_replacement_offsets", None)
        return self._process(text, images, **kwargs)

    def _process(
        self,
        text,
        images=None,
        hd_num: int | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        truncation: bool | str = False,
        add_special_tokens: bool = True,
        return_mm_token_type_ids: bool = False,
        return_offsets_mapping: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """`__call__` once the arguments are in place."""
        unexpected = sorted(key for key, value in kwargs.items() if value is not None)
        if unexpected:
            raise ValueError(
                f"Unexpected arguments {unexpected}; the processor takes text, images, hd_num and the standard "
                "tokenizer arguments padding, padding_side, pad_to_multiple_of, max_length, truncation, "
                "add_special_tokens, return_mm_token_type_ids and return_offsets_mapping."
            )
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}.")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length; pass max_length=..., or padding=True.")
        if truncation not in (True, False, None, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True or False, got {truncation!r}.")
        if return_offsets_mapping and not self.tokenizer.is_fast:
            raise ValueError(
                "return_offsets_mapping (used by return_assistant_tokens_mask) needs the fast tokenizer; load the "
                "processor with AutoProcessor.from_pretrained(folder, trust_remote_code=True, use_fast=True) and "
                "install `tokenizers`."
            )
        if hd_num is not None:
            hd_num = validate_hd_num(hd_num)  # also for text-only calls, so a bad value never passes silently
        prompts = [text] if isinstance(text, str) else list(text) if _is_text(text) else []
        if not prompts:
            raise ValueError("text must be a prompt string or a non-empty list of prompt strings.")
        for index, prompt in enumerate(prompts):
            check_text(prompt, f"text[{index}]")  # a lone surrogate is a RuntimeError deep in sentencepiece

        images_per_prompt = self._images_per_prompt(prompts, images)
        prompts = [self._place_images(prompt, len(own)) for prompt, own in zip(prompts, images_per_prompt)]
        flat_images = [to_pil_image(image) for own in images_per_prompt for image in own]

        # Lengths from the image sizes alone: an over-long prompt is refused before any tile is made (at hd_num 1000
        # one photo's tiles take gigabytes). The image processor's grids give the same counts (one rule).
        size = (self.image_processor.image_size, self.image_processor.patch_size)
        budget_hd_num = self.image_processor.hd_num if hd_num is None else hd_num
        image_lengths = [image_token_budget(*image.size, budget_hd_num, *size)[2] for image in flat_images]
        rows, offsets, start = [], [], 0
        for prompt in prompts:
            num_images = prompt.count(IMAGE_TOKEN)
            own_lengths = image_lengths[start : start + num_images]
            if return_offsets_mapping:
                ids, spans = self._prompt_ids(prompt, own_lengths, add_bos=add_special_tokens, with_offsets=True)
                offsets.append(spans)
            else:
                ids = self._prompt_ids(prompt, own_lengths, add_bos=add_special_tokens)
            rows.append(ids)
            if max_length is not None and len(ids) > max_length:
                own = slice(start, start + num_images)
                raise ValueError(self._too_long(len(ids), max_length, image_lengths[own], flat_images[own], hd_num))
            start += num_images
        data = {}
        if flat_images:
            data = dict(self.image_processor(flat_images, hd_num=hd_num, return_tensors=return_tensors))

        length = max(len(row) for row in rows)
        if padding in (False, "do_not_pad") and any(len(row) != length for row in rows):
            raise ValueError(
                f"The prompts have {sorted({len(row) for row in rows})} ids and padding=False; pass padding=True to "
                "batch prompts of different lengths."
            )
        if padding == "max_length":
            length = max_length
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        data.update(self._pad(rows, padding_side, length))
        if return_mm_token_type_ids:
            data["mm_token_type_ids"] = (data["input_ids"] == self.image_token_id) & (data["attention_mask"] == 1)
            data["mm_token_type_ids"] = data["mm_token_type_ids"].astype(np.int64)
        if return_offsets_mapping:
            spans = np.zeros((len(rows), length, 2), dtype=np.int64)  # pads: empty spans, as fast tokenizers give
            for index, own in enumerate(offsets):
                first = length - len(own) if padding_side == "left" else 0
                spans[index, first : first + len(own)] = own
            data["offset_mapping"] = spans
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
        (docs/model.md section 6), so this is our documented choice.
        """
        if num_images == 0 or IMAGE_TOKEN in prompt:
            return prompt
        user_turn = TURN_START + "user\n"
        cut = prompt.rfind(user_turn)
        cut = 0 if cut < 0 else cut + len(user_turn)
        return prompt[:cut] + IMAGE_TOKEN * num_images + prompt[cut:]

    def _prompt_ids(self, prompt: str, image_lengths: list[int], bos_per_segment: bool = True, add_bos: bool = True,
                    with_offsets: bool = False):  # fmt: skip
        """Ids of one prompt: the text segments between `<ImageHere>` tokenised one by one, each image as its run of
        placeholder ids. BOS goes before every non-empty segment (the chat rule) or, with `bos_per_segment=False`,
        before the first one only (the training rule, docs/model.md section 7); `add_bos=False` leaves out every BOS.

        With `with_offsets`, returns `(ids, offsets)`: each id's `(start, end)` characters in `prompt` (fast tokenizer
        only), empty spans for BOS and for an image's ids (at its `<ImageHere>`), so no text span covers them."""
        segments = prompt.split(IMAGE_TOKEN)
        texts = [segment for segment in segments if segment]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets) if texts else {}
        text_ids = iter(encoded.get("input_ids", []))
        text_offsets = iter(encoded.get("offset_mapping", []))
        bos_id = self.tokenizer.bos_token_id
        ids, offsets, need_bos, position = [], [], add_bos, 0
        for index, segment in enumerate(segments):
            if segment:
                segment_ids = next(text_ids)
                if self.image_token_id in segment_ids:
                    piece = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
                    raise ValueError(
                        f"The text contains {piece!r}, the piece reserved for image positions (id "
                        f"{self.image_token_id}). Remove it from the text; write {IMAGE_TOKEN} where an image goes."
                    )
                ids += [bos_id] * need_bos + segment_ids
                if with_offsets:
                    # An empty span where the BOS stands, so the starts stay sorted (transformers 4.57 bisects them).
                    bos_spans = [(position, position)] * need_bos
                    offsets += bos_spans + [(position + a, position + b) for a, b in next(text_offsets)]
                need_bos = add_bos and bos_per_segment
                position += len(segment)
            if index < len(image_lengths):
                ids += [self.image_token_id] * image_lengths[index]
                offsets += [(position, position)] * image_lengths[index]
                position += len(IMAGE_TOKEN)
        if not image_lengths and bos_per_segment and add_bos:
            # The original text-only chat tokenised "<s>" + prompt with BOS: two BOS ids (docs/model.md section 6).
            ids, offsets = [bos_id] + ids, [(0, 0)] + offsets
        return (ids, offsets) if with_offsets else ids

    # ---- Training examples (docs/model.md section 7) ----

    def training_text(self, messages) -> str:
        """The training text of a conversation: its user and assistant turns in the chat format, no system turn.

        The labels of `mask_human_turns` are right only for text whose turn markers, BOS and EOS are exactly the ones
        the format puts there, so two rules (docs/model.md section 7) make the mask provably right:
        - turns alternate user, assistant, starting with a user turn and ending with an answer;
        - no content tokenises to a special id (`<s>`, `</s>`, `<unk>`), a turn marker or the image placeholder: such
          text (e.g. a literal "</s>" in scraped HTML) is refused, not trained as an end of sequence.

        Args:
            messages (`list[dict]`): `{"role": "user" | "assistant", "content": str}` turns, in order; contents are
                stripped, as the official fine-tuning code does.

        Raises:
            `ValueError`: for a malformed turn, turns out of order, or content with a reserved piece.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"A conversation must be a non-empty list of turns, got {messages!r:.80}.")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ValueError(
                    f"Turn {index} of the conversation is {message!r:.80}; every turn needs a role 'user' or "
                    "'assistant' and a string content."
                )
            check_text(message.get("content"), f"The content of turn {index}")
            expected = ("user", "assistant")[index % 2]
            if message["role"] != expected:
                raise ValueError(
                    f"Turn {index} of the conversation is a {message['role']} turn where a {expected} turn belongs: "
                    "turns must alternate user, assistant, starting with user, or the labels would train the wrong "
                    "span. Merge consecutive turns of one role into one turn."
                )
        if len(messages) % 2:
            raise ValueError(
                f"The conversation ends with a user turn (turn {len(messages) - 1}), which has no answer to train; end "
                "it with an assistant turn or drop the last question."
            )
        turns = [{"role": message["role"], "content": message["content"].strip()} for message in messages]
        self._check_reserved_pieces(turns)
        return self.apply_chat_template([{"role": "system", "content": ""}] + turns, add_generation_prompt=False)

    def _check_reserved_pieces(self, turns):
        """Refuse turn contents that tokenise to a special id, a turn marker or the image placeholder id."""
        reserved = {*self.tokenizer.all_special_ids, self.image_token_id}
        reserved |= set(self.tokenizer.convert_tokens_to_ids([TURN_START, TURN_END]))
        contents = [turn["content"] for turn in turns]
        for index, ids in enumerate(self.tokenizer(contents, add_special_tokens=False)["input_ids"]):
            found = next((token for token in ids if token in reserved), None)
            if found is not None:
                piece = self.tokenizer.convert_ids_to_tokens(found)
                raise ValueError(
                    f"Turn {index} ({turns[index]['role']}) contains {piece!r}, which tokenises to the reserved id "
                    f"{found} (a special token, a turn marker or the image placeholder): the labels would cover the "
                    f"wrong span. Remove or rewrite it in the text; write {IMAGE_TOKEN} where an image goes."
                )

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
        # The length from the image sizes alone, so an over-long example is refused before its tiles are made.
        size = (self.image_processor.image_size, self.image_processor.patch_size)
        image_lengths = [image_token_budget(*image.size, hd_num, *size)[2] for image in images]
        ids = self._prompt_ids(text, image_lengths, bos_per_segment=False) + [self.tokenizer.eos_token_id]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(self._too_long(len(ids), max_length, image_lengths, images, hd_num))
        data = dict(self.image_processor(images, hd_num=hd_num, return_tensors="pt")) if images else {}
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
        """Labels of the official fine-tuning (docs/model.md section 7) for ids laid out by `training_example`.

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

    def _pad(self, rows: list[list[int]], padding_side: str, length: int) -> dict[str, np.ndarray]:
        """Pad id rows to `length` with the tokenizer's pad id; the mask is 0 exactly on the pads."""
        input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[index, span] = row
            attention_mask[index, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids into replies without the turn-end marker, for `pipeline("image-text-to-text")`.

        The marker is an ordinary piece (`skip_special_tokens` keeps it), so each text is cut at the first
        `[UNUSED_TOKEN_145]` after the prompt's last `[UNUSED_TOKEN_146]assistant\\n` (anywhere, without one): a
        decoded prompt is left whole, and prompt plus reply loses what follows the reply.

        Args:
            generated_outputs (`torch.Tensor` or `np.ndarray` of shape `(B, L)` or `(L,)`): ids from `generate`.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): passed to the tokenizer's decoding.

        Returns:
            `list[str]`, or a `str` for one sequence of shape `(L,)`.
        """
        if getattr(generated_outputs, "ndim", 2) == 1:
            text = self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
            return self._cut_reply(text)
        texts = self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [self._cut_reply(text) for text in texts]

    @staticmethod
    def _cut_reply(text: str) -> str:
        """`text` up to the first turn-end marker after its last assistant header (or anywhere, without one)."""
        header = TURN_START + "assistant\n"
        start = text.rfind(header)
        start = 0 if start < 0 else start + len(header)
        return text[:start] + text[start:].split(TURN_END)[0]

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
