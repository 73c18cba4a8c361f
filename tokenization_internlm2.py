"""InternLM2 tokenizer: the published sentencepiece model (`tokenizer.model`) behind the slow-tokenizer API.

It gives the published tokenizer's ids and decoded text on transformers 4.57 and 5.x alike.
"""

import json
import os
from shutil import copyfile

import sentencepiece as spm
from transformers import PreTrainedTokenizer
from transformers.utils import logging

from .image_processing_4khd import check_not_lfs_pointer

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
CONFIG_FILE_NAME = "tokenizer_config.json"


def drop_tokens_outside_vocab(kwargs: dict, vocab_size: int, in_vocab) -> dict:
    """Remove from tokenizer `kwargs` the added tokens that would get ids past the `vocab_size` sentencepiece pieces
    (the published six), with a warning; `in_vocab(token)` says whether a token is a piece.

    They arrive as `added_tokens_decoder` entries and as `additional_special_tokens` (`extra_special_tokens` on
    transformers 5); the base class would re-add any listed special token that is missing from the vocabulary.
    """
    dropped = set()
    decoder = kwargs.get("added_tokens_decoder")
    if decoder:
        dropped.update(str(token) for index, token in decoder.items() if int(index) >= vocab_size)
        kwargs["added_tokens_decoder"] = {index: token for index, token in decoder.items() if int(index) < vocab_size}
    for key in ("additional_special_tokens", "extra_special_tokens"):
        tokens = kwargs.get(key)
        if isinstance(tokens, (list, tuple)):
            dropped.update(str(token) for token in tokens if not in_vocab(token))
            kwargs[key] = [token for token in tokens if in_vocab(token)]
    if dropped:
        logger.warning_once(
            f"Ignoring added tokens {sorted(dropped)}: they are not pieces of tokenizer.model and would get ids "
            "outside the model's embedding. Their text is tokenised as ordinary pieces. Remove them from "
            "tokenizer_config.json to silence this warning."
        )
    return kwargs


def join_pieces(tokens: list[str], special_tokens: set[str], decode) -> str:
    """The published tokenizer's decoding of `tokens`: runs of ordinary pieces decoded by `decode` (pieces -> text),
    special tokens kept verbatim, and each run of special tokens preceded by one space, placed before the text decoded
    since the previous run (so `decode([1, x])` reads `" <s>..."`)."""
    text, pieces, previous_is_special = "", [], False
    for token in tokens:
        if token in special_tokens:
            if not previous_is_special:
                text += " "
            text += decode(pieces) + token
            pieces, previous_is_special = [], True
        else:
            pieces.append(token)
            previous_is_special = False
    return text + decode(pieces)


def save_bos_eos_flags(tokenizer, files):
    """Write `add_bos_token`/`add_eos_token` into the `tokenizer_config.json` among the saved `files`: transformers 5
    drops them on save (it expects them in a post-processor), so `add_bos_token=False` would come back as True."""
    config_file = next(str(name) for name in files if str(name).endswith(CONFIG_FILE_NAME))
    with open(config_file, encoding="utf-8") as file:
        config = json.load(file)
    config.update(add_bos_token=tokenizer.add_bos_token, add_eos_token=tokenizer.add_eos_token)
    with open(config_file, "w", encoding="utf-8") as file:
        json.dump(config, file, indent=2, ensure_ascii=False)


class InternLM2Tokenizer(PreTrainedTokenizer):
    r"""The InternLM2 sentencepiece tokenizer, as published with InternLM-XComposer2-4KHD.

    `<unk>`, `<s>` (BOS, added in front by default) and `</s>` (EOS, also used for padding) are the sentencepiece
    control pieces. The chat markers `[UNUSED_TOKEN_146]` (turn start) and `[UNUSED_TOKEN_145]` (turn end) are ordinary
    pieces of the vocabulary (user-defined symbols of the sentencepiece model), so they encode to one id each and
    decode back to their text; they need no added-token machinery.

    The published `tokenizer_config.json` also registers six added tokens (`<|im_start|>` ... `<|plugin|>`) with ids
    92544-92549, beyond the model's 92544 embedding rows. Such tokens are dropped when the tokenizer is built (with a
    warning), so their text is tokenised as ordinary pieces and no id outside the sentencepiece vocabulary is ever
    produced: the original crashed inside the embedding on them instead.

    Args:
        vocab_file (`str`):
            Path to the sentencepiece model, `tokenizer.model`.
        unk_token (`str`, *optional*, defaults to `"<unk>"`), bos_token (`str`, *optional*, defaults to `"<s>"`),
        eos_token (`str`, *optional*, defaults to `"</s>"`), pad_token (`str`, *optional*, defaults to `"</s>"`):
            The special tokens; padding uses EOS, as in the published tokenizer.
        sp_model_kwargs (`dict`, *optional*):
            Passed to `sentencepiece.SentencePieceProcessor` (e.g. sampling options).
        add_bos_token (`bool`, *optional*, defaults to `True`):
            Put BOS in front of every encoded sequence.
        add_eos_token (`bool`, *optional*, defaults to `False`):
            Put EOS at the end of every encoded sequence.
        clean_up_tokenization_spaces (`bool`, *optional*, defaults to `False`):
            Passed to the base class; see `convert_tokens_to_string` for the clean-up the published decoding always
            applies.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        sp_model_kwargs=None,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # The base class asks for the vocabulary while it registers the special tokens, so load it first.
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        check_not_lfs_pointer(vocab_file, "sentencepiece model tokenizer.model")
        self.sp_model.Load(vocab_file)
        kwargs = self._drop_tokens_outside_vocab(kwargs)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def _in_vocab(self, token) -> bool:
        return self.sp_model.IdToPiece(self.sp_model.PieceToId(str(token))) == str(token)

    def _drop_tokens_outside_vocab(self, kwargs: dict) -> dict:
        return drop_tokens_outside_vocab(kwargs, self.sp_model.get_piece_size(), self._in_vocab)

    @property
    def vocab_size(self) -> int:
        """Number of sentencepiece pieces (92544 for the published model)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        """The vocabulary as `{piece: id}`, added tokens included."""
        vocab = {self.sp_model.IdToPiece(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.PieceToId(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces into text exactly as the published tokenizer does (see `join_pieces`), then apply
        `clean_up_tokenization` (`" ."` -> `"."`, `" n't"` -> `"n't"`, ...) whatever `clean_up_tokenization_spaces`
        says: the published code always did, and replies must read the same."""
        return self.clean_up_tokenization(join_pieces(tokens, set(self.all_special_tokens), self.sp_model.decode))

    def save_pretrained(self, *args, **kwargs):
        """`save_pretrained`, keeping `add_bos_token` and `add_eos_token` (transformers 5 leaves them out)."""
        files = super().save_pretrained(*args, **kwargs)
        save_bos_eos_flags(self, files)
        return files

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """`[BOS] ids_0 [ids_1] [EOS]`, with BOS and EOS as `add_bos_token` and `add_eos_token` say."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + token_ids_0 + (token_ids_1 or []) + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        """1 where `build_inputs_with_special_tokens` puts BOS or EOS, 0 on the sequence ids."""
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        return bos + [0] * (len(token_ids_0) + len(token_ids_1 or [])) + eos

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        """All zeros: InternLM2 has no token types."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy `tokenizer.model` (or write the loaded model) into `save_directory`.

        Returns:
            `tuple[str]`: The path of the saved file.
        """
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory must be an existing directory, got {save_directory!r}.")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out_file = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
                copyfile(self.vocab_file, out_file)
        else:
            with open(out_file, "wb") as file:
                file.write(self.sp_model.serialized_model_proto())
        return (out_file,)
