"""The helper API of the original remote code, which evaluation frameworks (VLMEvalKit, lmms-eval, ms-swift) call
directly instead of `chat`, and the original's repetition penalty. Every helper is built on the processor path, so
both give the same numbers (docs/original-api.md).
"""

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .image_processing_4khd import (
    CLIP_MEAN,
    CLIP_STD,
    InternLMXComposer2ImageProcessor,
    _to_rgb,
    tile_views,
    to_pil_image,
    validate_hd_num,
)
from .processing_internlm_xcomposer2 import DEFAULT_SYSTEM, IMAGE_TOKEN


def pixels_to_tiles(pixels, tile_size):
    """Cut one resized, padded and normalised image into the tiles the vision tower takes, by the image processor's
    rule (`tile_views`), in fp32 and then back to the input's dtype.

    Args:
        pixels (`torch.Tensor` of shape `(3, H, W)`): H and W multiples of `tile_size`.
        tile_size (`int`): the tower's input side.
    Returns:
        `(tiles, image_grids)`: `(1 + rows * cols, 3, S, S)` tiles in the dtype of `pixels` (the global view, then
        the crops in row-major order) and the `(1, 2)` grid `[[rows, cols]]`.
    """
    global_view, crops = tile_views(pixels.float(), tile_size)  # (3, S, S), (rows, cols, 3, S, S)
    rows, cols = crops.shape[:2]
    tiles = torch.cat([global_view[None], crops.reshape(rows * cols, 3, tile_size, tile_size)])
    return tiles.to(pixels.dtype), torch.tensor([[rows, cols]])


class ReplyRepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (divide positive scores of already seen ids by `penalty`, multiply negative
    ones), where row b sees only its ids from position `starts[b]` on.

    The original chat generated from embeddings when it had an image, so the penalty saw only the reply; with text
    only it passed the ids, so the prompt counted too. `starts` says which for each prompt row (`_original_penalty`).

    Args:
        penalty (`float`): strictly positive; 1.0 changes nothing.
        starts (`torch.LongTensor` of shape `(B,)`): per prompt row, the first counted position. Beam search and
            `num_return_sequences` repeat each row in place, so the rows of `input_ids` are matched by repetition.
    """

    def __init__(self, penalty, starts):
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a strictly positive float, got {penalty!r}; 1.0 is off.")
        self.penalty = float(penalty)
        self.starts = starts

    def __call__(self, input_ids, scores):
        rows, length = input_ids.shape
        vocab_size = scores.shape[-1]
        starts = self.starts.to(input_ids.device).repeat_interleave(rows // self.starts.shape[0])  # (rows,)
        counted = torch.arange(length, device=input_ids.device) >= starts[:, None]  # (rows, length)
        # Uncounted positions scatter into a spare last column, dropped after.
        seen = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, input_ids.masked_fill(~counted, vocab_size).to(scores.device), True)
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen[:, :vocab_size], penalised, scores)


class OriginalAPIMixin:
    """The original remote code's helpers on `InternLMXComposer2ForCausalLM`.

    The frameworks' pattern: set `model.tokenizer` and `model.hd_num`; embed `BOS` with `encode_text`, the image
    (HD-transformed by the caller, then `vis_processor`) with `encode_img`, the text with `encode_text`; concatenate;
    then `generate(inputs_embeds=..., im_mask=...)`, which returns only the new tokens.
    """

    # Set by the caller (`model.tokenizer = tokenizer`), as with the original; `encode_text` reads it.
    tokenizer = None

    @property
    def hd_num(self) -> int:
        """The default maximum number of crops per image of `encode_img` and `build_processor`: `config.hd_num`.
        The evaluation frameworks set it per benchmark (16, 25, 55, 65)."""
        return self.config.hd_num

    @hd_num.setter
    def hd_num(self, value):
        self.config.hd_num = validate_hd_num(value)

    def encode_text(self, text, add_special_tokens=False):
        """Token embeddings of `text`, tokenised by `model.tokenizer`.

        Args:
            text (`str`): any text; chat markers are ordinary pieces.
            add_special_tokens (`bool`): True puts BOS in front (so `encode_text("", True)` is BOS alone).
        Returns:
            `torch.Tensor` of shape `(1, T, hidden)` on the embedding's device.
        """
        if self.tokenizer is None:
            raise ValueError(
                "encode_text needs model.tokenizer; set it first: model.tokenizer = AutoTokenizer.from_pretrained("
                "path, trust_remote_code=True)."
            )
        embedding = self.get_input_embeddings()
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
        return embedding(ids.to(embedding.weight.device))

    def vis_processor(self, image):
        """The original's `vis_processor`: an RGB image to a `(3, H, W)` float32 tensor, scaled to [0, 1] and
        normalised with CLIP's mean and std; no resize (the caller HD-transforms first). The same float operations as
        torchvision's `ToTensor` + `Normalize` and as the image processor, so the values are bit-identical.

        Args:
            image: a PIL image (or a path or uint8 array, as the image processor accepts); converted to RGB.
        """
        rgb = np.asarray(_to_rgb(to_pil_image(image)))  # (H, W, 3) uint8
        pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255)  # (3, H, W)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
        return pixels.sub(mean).div(std)

    def encode_img(self, image, hd_num=None):
        """Vision features of one image: the global view, separator and local crops with their newlines, projected.

        Args:
            image: a `(1, 3, H, W)` tensor from `vis_processor(hd_transformed).unsqueeze(0)` (H and W multiples of the
                tile size), used as is; or a path or PIL image, which gets the HD transform of the image processor.
            hd_num (`int`, *optional*): for a path or PIL image, the maximum number of crops; defaults to
                `model.hd_num`.
        Returns:
            `torch.Tensor` of shape `(1, L, hidden)`: the features the processor path scatters into the image's L
            placeholder positions, bit-identical for the same image and hd_num.
        """
        if isinstance(image, torch.Tensor):
            return self.img2emb(image)[0]
        vision = self.config.vision_config
        image_processor = InternLMXComposer2ImageProcessor(image_size=vision.image_size, patch_size=vision.patch_size)
        inputs = image_processor(image, hd_num=self.hd_num if hd_num is None else hd_num)
        return self.get_image_features(inputs["pixel_values"].to(self.device), inputs["image_grids"])[0][None]

    def img2emb(self, image):
        """The original's `img2emb`: features of one prepared image tensor, with its attention mask and labels.

        Args:
            image (`torch.Tensor` of shape `(1, 3, H, W)`): see `encode_img`; any float dtype and device.
        Returns:
            `(features, attention_mask, labels)`: `(1, L, hidden)` features, `(1, L)` ones and `(1, L)` -100 (image
            positions are never trained), as the original returned them.
        """
        size = self.config.vision_config.image_size
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[:2] == (1, 3)):
            raise ValueError(
                f"encode_img/img2emb take one image as a (1, 3, H, W) tensor, got {shape}; pass "
                "model.vis_processor(image).unsqueeze(0), one image per call."
            )
        if image.shape[2] % size or image.shape[3] % size or 0 in image.shape:
            raise ValueError(
                f"The image tensor is {image.shape[3]} x {image.shape[2]} pixels; both sides must be multiples of "
                f"{size}. HD-transform (resize and white padding) the image first, or pass the PIL image or its path "
                "with hd_num to encode_img."
            )
        # Tiled on the CPU, where the image processor tiles, so the global view is bit-identical to its own.
        tiles, grids = pixels_to_tiles(image[0].cpu(), size)
        features = self.get_image_features(tiles.to(self.device), grids)[0][None]  # (1, L, hidden)
        ones = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
        return features, ones, ones * -100

    def build_inputs(self, tokenizer, query, history=(), meta_instruction=DEFAULT_SYSTEM):
        """The original's text-only prompt: `input_ids` and `attention_mask` `(1, T)` of the chat prompt (which
        starts with two BOS, as there), on the model's device."""
        processor = self.build_processor(tokenizer)
        return processor(processor.build_prompt(query, history, meta_instruction)).to(self.device)

    def interleav_wrap_chat(self, tokenizer, query, image, history=(), meta_instruction=DEFAULT_SYSTEM):
        """The original's image prompt as embeddings: the chat prompt of `query` with image features in place of its
        `<ImageHere>` (BOS before every text segment, as in `chat`).

        Args:
            tokenizer: the InternLM2 tokenizer.
            query (`str`): the user's message with one `<ImageHere>` per image.
            image (`torch.Tensor` of shape `(N, L, hidden)`): `encode_img` outputs, concatenated.
            history (`list[tuple[str, str]]`), meta_instruction (`str`): as for `chat`.
        Returns:
            `({"inputs_embeds": (1, T, hidden)}, im_mask)`, im_mask `(1, T)` bool, true at image positions: the
            arguments of `generate`.
        """
        processor = self.build_processor(tokenizer)
        prompt = processor.build_prompt(query, history, meta_instruction)
        if prompt.count(IMAGE_TOKEN) != len(image):
            raise ValueError(
                f"The prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} but {len(image)} images were given; write "
                f"one {IMAGE_TOKEN} per image where it goes."
            )
        ids = processor._prompt_ids(prompt, [image.shape[1]] * len(image))
        if len(ids) > self.config.max_sequence_length:
            raise ValueError(
                f"The prompt is {len(ids)} positions long, more than max_sequence_length="
                f"{self.config.max_sequence_length}; encode the images with a smaller hd_num or shorten the text."
            )
        input_ids = torch.tensor([ids], device=self.get_input_embeddings().weight.device)
        inputs_embeds, image_mask = self._scatter_image_features(input_ids, image.reshape(-1, image.shape[-1]))
        return {"inputs_embeds": inputs_embeds}, image_mask

    def _original_penalty(self, generate_kwargs, inputs):
        """`generate_kwargs` with its `repetition_penalty` counted as the original chat counted it: for a prompt with
        images only the reply's ids, for a text-only prompt also the prompt's ids (never left padding).

        Args:
            generate_kwargs (`dict`): `generate` arguments, maybe with `repetition_penalty` and `logits_processor`.
            inputs: the processor's output for the prompts (`input_ids`, `attention_mask`).
        Returns:
            `dict`: the arguments for `generate`, the penalty moved into a `ReplyRepetitionPenalty`.
        """
        generate_kwargs = dict(generate_kwargs)
        penalty = generate_kwargs.get("repetition_penalty")
        if penalty is None or penalty == 1.0:
            return generate_kwargs
        input_ids = inputs["input_ids"]
        has_image = (input_ids == self.config.image_token_id).any(dim=1)  # (B,)
        padding = (inputs["attention_mask"] == 0).sum(dim=1)  # (B,) left padding
        starts = torch.where(has_image, input_ids.shape[1], padding)
        processors = [*(generate_kwargs.get("logits_processor") or []), ReplyRepetitionPenalty(penalty, starts)]
        generate_kwargs["logits_processor"] = LogitsProcessorList(processors)
        generate_kwargs["repetition_penalty"] = 1.0  # transformers' own would count the prompt again
        return generate_kwargs
