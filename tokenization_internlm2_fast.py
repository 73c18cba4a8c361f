"""InternLM2 fast tokenizer: the published sentencepiece model (`tokenizer.model`) rebuilt as a `tokenizers` BPE,
giving the slow `InternLM2Tokenizer`'s ids and decoded text plus offsets, `word_ids()` and batch speed.

A folder without `tokenizer.json` is converted on load (about a second for the 92544 pieces); `save_pretrained`
writes `tokenizer.json` so later loads skip it.
"""

import json
import os
import re
import struct
from shutil import copyfile

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from .image_processing_4khd import check_not_lfs_pointer
from .tokenization_internlm2 import (
    VOCAB_FILES_NAMES,
    InternLM2Tokenizer,
    drop_tokens_outside_vocab,
    join_pieces,
    save_bos_eos_flags,
)

# sentencepiece_model.proto field numbers, and the proto2 defaults of the fields read here.
_PIECE_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
_TRAINER_FIELDS = {3: "model_type", 22: "split_by_whitespace", 24: "treat_whitespace_as_suffix",
                   25: "split_digits", 26: "allow_whitespace_only_pieces", 35: "byte_fallback"}  # fmt: skip
_NORMALIZER_FIELDS = {1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                      5: "escape_whitespaces"}  # fmt: skip
_TRAINER_DEFAULTS = {"model_type": 1, "split_by_whitespace": True, "treat_whitespace_as_suffix": False,
                     "split_digits": False, "allow_whitespace_only_pieces": False, "byte_fallback": False}  # fmt: skip
_NORMALIZER_DEFAULTS = {"name": "", "precompiled_charsmap": b"", "add_dummy_prefix": True,
                        "remove_extra_whitespaces": True, "escape_whitespaces": True}  # fmt: skip
_BPE = 2
_SPACE = "\u2581"  # sentencepiece's visible space


def _fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varints and fixed32 floats' raw bits as float, bytes for
    length-delimited fields. Enough of the wire format for sentencepiece's model file (no protobuf package needed)."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 1:
            value, position = data[position : position + 8], position + 8
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position : position + length], position + length
        elif wire_type == 5:
            value, position = struct.unpack("<f", data[position : position + 4])[0], position + 4
        else:
            raise ValueError(f"tokenizer.model is not a sentencepiece model (protobuf wire type {wire_type}).")
        yield number, value


def _varint(data: bytes, position: int):
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _message(data: bytes, names: dict, defaults: dict) -> dict:
    spec = dict(defaults)
    for number, value in _fields(data):
        if number in names:
            default = defaults[names[number]]
            spec[names[number]] = value.decode("utf-8") if names[number] == "name" else type(default)(value)
    return spec


def read_sentencepiece_model(serialized: bytes):
    """The pieces `[(piece, score, type)]`, trainer spec and normalizer spec of a serialized sentencepiece model."""
    pieces, trainer, normalizer = [], dict(_TRAINER_DEFAULTS), dict(_NORMALIZER_DEFAULTS)
    for number, value in _fields(serialized):
        if number == 1:
            piece = {1: b"", 2: 0.0, 3: 1} | dict(_fields(value))
            pieces.append((piece[1].decode("utf-8"), piece[2], _PIECE_TYPES[piece[3]]))
        elif number == 2:
            trainer = _message(value, _TRAINER_FIELDS, _TRAINER_DEFAULTS)
        elif number == 3:
            normalizer = _message(value, _NORMALIZER_FIELDS, _NORMALIZER_DEFAULTS)
    return pieces, trainer, normalizer


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's score-ordered merging: every split of a piece into two pieces, ranked
    by the id of the merged piece (sentencepiece orders BPE pieces by score), then by the ids of its halves."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def sentencepiece_to_tokenizers(vocab_file: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the BPE sentencepiece model in `vocab_file`.

    Pieces keep their ids. Normalisation, dummy prefix, word splitting and byte fallback follow the model's own specs;
    BOS/EOS are added by the tokenizer class. Control pieces (`<s>`, `</s>`) are added tokens that split the raw text
    first, as the slow tokenizer splits them out before sentencepiece. User-defined pieces (the chat markers
    `[UNUSED_TOKEN_*]`) are never split: added tokens too when the model adds no dummy prefix; with a dummy prefix
    they must be found in the normalised text instead, as sentencepiece does (so `"x[UNUSED_TOKEN_146]y"` gets one
    prefix, before `x`), which a word split of their own and a vocabulary look-up of whole words reproduce.

    Raises:
        `ValueError`: for a unigram or suffix-whitespace model, which this conversion does not reproduce.
    """
    check_not_lfs_pointer(vocab_file, "sentencepiece model tokenizer.model")
    with open(vocab_file, "rb") as file:
        pieces, trainer, normalizer = read_sentencepiece_model(file.read())
    if trainer["model_type"] != _BPE or trainer["treat_whitespace_as_suffix"]:
        raise ValueError(
            f"{vocab_file} is not a prefix-whitespace BPE sentencepiece model like InternLM2's; load the slow "
            "InternLM2Tokenizer for it."
        )
    vocab = {piece: index for index, (piece, _, _) in enumerate(pieces)}
    unk = next(piece for piece, _, kind in pieces if kind == "unknown")
    mergeable = {piece: index for piece, index in vocab.items() if pieces[index][2] in ("normal", "byte", "unknown")}
    symbols = [piece for piece, _, kind in pieces if kind == "user_defined"]
    symbols_in_words = bool(symbols) and normalizer["add_dummy_prefix"]
    model = BPE(
        vocab=vocab,
        merges=_merges(mergeable),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=trainer["byte_fallback"],
        ignore_merges=symbols_in_words,  # a whole word that is a piece is that piece: how markers get their ids
    )
    tokenizer = Tokenizer(model)

    steps = []
    if normalizer["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(normalizer["precompiled_charsmap"]))
    if normalizer["remove_extra_whitespaces"]:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(_SPACE))
    if normalizer["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", _SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)

    # sentencepiece splits text into words before its BPE: each word starts at a space (a run of spaces stays one
    # word with `allow_whitespace_only_pieces`), digits stand alone with `split_digits`, user-defined pieces too.
    other = f"[^{_SPACE}\\d]" if trainer["split_digits"] else f"[^{_SPACE}]"
    word = f"{_SPACE}+{other}*|{other}+" if trainer["allow_whitespace_only_pieces"] else f"{_SPACE}?{other}*"
    if trainer["split_digits"]:
        word = f"\\d|{word}"
    splits = []
    if symbols_in_words:
        symbol = "|".join(re.escape(piece) for piece in symbols)
        splits.append(pre_tokenizers.Split(Regex(symbol), behavior="isolated"))
        word = f"{symbol}|{word}"
    if trainer["split_by_whitespace"] or trainer["split_digits"] or symbols_in_words:
        splits.append(pre_tokenizers.Split(Regex(word), behavior="isolated"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)

    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer["add_dummy_prefix"]:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)

    controls = [piece for piece, _, kind in pieces if kind in ("control", "unknown")]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in controls])
    if not symbols_in_words:
        tokenizer.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in symbols])
    return tokenizer


def _special_tokens_added(backend: Tokenizer, bos_token: str, eos_token: str) -> tuple[bool, bool]:
    """Whether the backend's post-processor adds BOS and EOS; (True, False), the defaults, when it has none."""
    if backend.post_processor is None:
        return True, False
    state = json.loads(backend.post_processor.__getstate__())
    added = [item["SpecialToken"]["id"] for item in state.get("single", []) if "SpecialToken" in item]
    return bos_token in added, eos_token in added


def _id_below(backend: Tokenizer, token, size: int) -> bool:
    index = backend.token_to_id(str(token))
    return index is not None and index < size


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    r"""The InternLM2 tokenizer on the `tokenizers` library: same ids, special tokens and decoded text as
    `InternLM2Tokenizer`, plus `offset_mapping` and `word_ids()` (which `return_assistant_tokens_mask` needs).

    Built from `tokenizer.json` when the folder has one, else converted from `tokenizer.model` (see
    `sentencepiece_to_tokenizers`). The chat markers are added tokens here (one id each, never split), and ordinary
    pieces in the slow tokenizer; both give the same ids.

    Args:
        vocab_file (`str`, *optional*): the sentencepiece model, `tokenizer.model`.
        tokenizer_file (`str`, *optional*): a `tokenizer.json` written by `save_pretrained`.
        add_bos_token (`bool`, *optional*), add_eos_token (`bool`, *optional*):
            Put BOS in front of / EOS after every encoded sequence; by default what `tokenizer.json` does, else BOS
            and no EOS. Saved with the tokenizer.
        Other arguments as for `InternLM2Tokenizer`.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model", "tokenizer_file": "tokenizer.json"}
    slow_tokenizer_class = InternLM2Tokenizer
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        tokenizer_file=None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        add_bos_token=None,
        add_eos_token=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        backend = kwargs.pop("tokenizer_object", None)
        if backend is None and tokenizer_file is not None:
            backend = Tokenizer.from_file(tokenizer_file)
        if backend is None:
            if vocab_file is None:
                raise ValueError(
                    "InternLM2TokenizerFast needs tokenizer.json or tokenizer.model; put the published tokenizer.model "
                    "next to the code."
                )
            backend = sentencepiece_to_tokenizers(vocab_file)
        kwargs.pop("from_slow", None)  # transformers' own conversion does not know this model; ours is above
        # As in the slow tokenizer: added tokens past the sentencepiece pieces would be ids outside the embedding.
        size = backend.get_vocab_size(with_added_tokens=False)
        kwargs = drop_tokens_outside_vocab(kwargs, size, lambda token: _id_below(backend, token, size))
        # transformers 5 does not pass the flags when it loads tokenizer.json, whose post-processor holds them then.
        # They are applied after the base class, which would rebuild the post-processor from its own defaults.
        saved_bos, saved_eos = _special_tokens_added(backend, str(bos_token), str(eos_token))
        add_bos_token = saved_bos if add_bos_token is None else add_bos_token
        add_eos_token = saved_eos if add_eos_token is None else add_eos_token
        self._add_bos_token, self._add_eos_token = add_bos_token, add_eos_token
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_object=backend,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.vocab_file = vocab_file
        self._add_bos_token, self._add_eos_token = add_bos_token, add_eos_token
        self.update_post_processor()

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        """transformers 5 hook that would convert `tokenizer.model` itself (and fail on this model without protobuf):
        the files are passed through as they are, and `__init__` reads them."""
        return kwargs

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value):
        self._add_bos_token = value
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value):
        self._add_eos_token = value
        self.update_post_processor()

    def update_post_processor(self):
        """BOS and EOS around each sequence as `add_bos_token` and `add_eos_token` say (as the slow tokenizer does)."""
        bos = f"{self.bos_token}:0 " if self._add_bos_token else ""
        eos = f" {self.eos_token}:0" if self._add_eos_token else ""
        special = [(token, self.convert_tokens_to_ids(token)) for token, used in
                   ((self.bos_token, self._add_bos_token), (self.eos_token, self._add_eos_token)) if used]  # fmt: skip
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0{eos}", pair=f"{bos}$A:0 $B:1{eos}", special_tokens=special
        )

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """Decoded text exactly as the slow tokenizer gives it (see `InternLM2Tokenizer.convert_tokens_to_string`)."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special_ids = set(self.all_special_ids)
        if skip_special_tokens:
            ids = [index for index in ids if index not in special_ids]
        tokens = self.convert_ids_to_tokens(ids)
        text = join_pieces(tokens, set(self.all_special_tokens), self.backend_tokenizer.decoder.decode)
        return self.clean_up_tokenization(text)

    def save_pretrained(self, *args, **kwargs):
        """`save_pretrained`, keeping `add_bos_token` and `add_eos_token` (transformers 5 leaves them out)."""
        files = super().save_pretrained(*args, **kwargs)
        save_bos_eos_flags(self, files)
        return files

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        """`tokenizer.json`, and `tokenizer.model` beside it (transformers 5 writes only the former)."""
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return tuple(dict.fromkeys(file_names + self.save_vocabulary(str(save_directory), filename_prefix)))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy `tokenizer.model` beside `tokenizer.json`, so the slow tokenizer loads from the folder too."""
        if self.vocab_file is None or not os.path.isfile(self.vocab_file):
            return ()
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out_file = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
            copyfile(self.vocab_file, out_file)
        return (out_file,)
