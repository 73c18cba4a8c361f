"""Training examples (docs/model.md section 7): ids and labels against ones built by hand from raw sentencepiece, the
data.txt mixing file, dropping over-long samples, and batches that mix images and text."""

import json
import logging

import pytest
import sentencepiece as spm
import torch
from conftest import TINY_CONFIG, load_file, write_model_dir, write_processor_dir
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

IGNORE = -100


data = load_file("scripts/finetune_data.py")


@pytest.fixture(scope="module")
def sp(sp_model_file):
    return spm.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sp_model_file, sp):
    image_token_id = sp.piece_to_id("[UNUSED_TOKEN_140]")
    path = write_processor_dir(tmp_path_factory.mktemp("train") / "tiny", sp_model_file, image_token_id)
    config = {**TINY_CONFIG, "vocab_size": sp.vocab_size(), "image_token_id": image_token_id, "plora_dropout": 0.0}
    write_model_dir(path, config)
    Image.new("RGB", (100, 60), (220, 20, 20)).save(path / "red.png")
    Image.new("RGB", (40, 150), (20, 20, 220)).save(path / "blue.png")
    return path


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def hand_built(sp, parts, image_token_id):
    """Ids and labels from `(piece, trained)` parts: text is encoded by raw sentencepiece, an int is that many
    image positions (never trained), "<s>"/"</s>" are BOS/EOS."""
    ids, labels = [], []
    for piece, trained in parts:
        if isinstance(piece, int):
            piece_ids = [image_token_id] * piece
        elif piece in ("<s>", "</s>"):
            piece_ids = [sp.bos_id() if piece == "<s>" else sp.eos_id()]
        else:
            piece_ids = sp.encode(piece)
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    return ids, labels


S, E = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
ONE_TURN = [
    {"role": "user", "content": "<ImageHere>What colour is the square? "},
    {"role": "assistant", "content": " It is red."},
]
TWO_TURNS = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye now"},
]


def test_one_image_turn_ids_and_labels_equal_hand_built(processor, sp):
    example = processor.training_example(ONE_TURN, [Image.new("RGB", (100, 60))], hd_num=4)
    rows, cols = example["image_grids"][0].tolist()
    assert (rows, cols) == (2, 2)
    image_tokens = 2 * 2 * (rows * cols + 1) + 1 + 2 * (rows + 1)  # t = 56 / 14 / 2 = 2 tokens per tile side
    parts = [
        ("<s>", False), (S + "user\n", False), (image_tokens, False), ("What colour is the square?", False),
        (E, False), ("\n" + S + "assistant\n", False),  # the user turn's end and the 5-id assistant header
        ("It is red.", True), (E, True), ("\n", True), ("</s>", True),  # the last answer, its newline and EOS
    ]  # fmt: skip
    ids, labels = hand_built(sp, parts, processor.image_token_id)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    assert len(sp.encode("\n" + S + "assistant\n")) == 5


def test_multi_turn_labels_train_answers_only(processor, sp):
    example = processor.training_example(TWO_TURNS)
    parts = [
        ("<s>", False), (S + "user\nHello", False), (E, False), ("\n" + S + "assistant\n", False),
        ("Hi", True), (E, True),  # an earlier answer: its marker is trained, the newline after it is not
        ("\n", False), (S + "user\nBye", False), (E, False), ("\n" + S + "assistant\n", False),
        ("Bye now", True), (E, True), ("\n", True), ("</s>", True),
    ]  # fmt: skip
    ids, labels = hand_built(sp, parts, processor.image_token_id)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    assert "pixel_values" not in example


def test_cut_ids_follow_the_original_truncation_rule(processor, sp):
    ids = processor.training_example(TWO_TURNS)["input_ids"].tolist()
    turn_end = sp.piece_to_id(E)
    ends = [index for index, token in enumerate(ids) if token == turn_end]
    # Cut inside the second question (even marker count, no EOS): masked from one past the first answer's marker,
    # so the id right after that marker stays trained, as in the original.
    cut = ids[: ends[2]]
    labels = processor.mask_human_turns(cut)
    trained = [index for index, label in enumerate(labels) if label != IGNORE]
    answer_start = ends[0] + 6
    assert trained == list(range(answer_start, ends[1] + 2))
    # Cut inside the second answer (odd count): the partial answer is trained.
    cut = ids[: ends[3]]
    labels = processor.mask_human_turns(cut)
    assert labels[ends[2] + 6 :] == cut[ends[2] + 6 :]
    assert all(label == IGNORE for label in labels[ends[1] + 1 : ends[2] + 6])


def test_answers_and_images_in_several_turns(processor, sp):
    messages = [
        {"role": "user", "content": "<ImageHere>First?"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "<ImageHere>Second?"},
        {"role": "assistant", "content": "Two."},
    ]
    images = [Image.new("RGB", (100, 60)), Image.new("RGB", (40, 150))]
    example = processor.training_example(messages, images, hd_num=2)
    lengths = [2 * 2 * (r * c + 1) + 1 + 2 * (r + 1) for r, c in example["image_grids"].tolist()]
    parts = [
        ("<s>", False), (S + "user\n", False), (lengths[0], False), ("First?", False), (E, False),
        ("\n" + S + "assistant\n", False), ("One.", True), (E, True), ("\n", False), (S + "user\n", False),
        (lengths[1], False), ("Second?", False), (E, False), ("\n" + S + "assistant\n", False),
        ("Two.", True), (E, True), ("\n", True), ("</s>", True),
    ]  # fmt: skip
    ids, labels = hand_built(sp, parts, processor.image_token_id)
    assert example["input_ids"].tolist() == ids
    assert example["labels"].tolist() == labels
    assert example["pixel_values"].shape[0] == sum(r * c + 1 for r, c in example["image_grids"].tolist())


@pytest.mark.parametrize("size", [(100, 60), (40, 150), (300, 20), (56, 56)])
@pytest.mark.parametrize("hd_num", [1, 3, 9])
def test_training_length_equals_the_built_example(processor, size, hd_num):
    example = processor.training_example(ONE_TURN, [Image.new("RGB", size)], hd_num=hd_num)
    assert processor.training_length(ONE_TURN, [size], hd_num) == len(example["input_ids"])


def test_training_example_errors(processor):
    with pytest.raises(ValueError, match="1 <ImageHere> but 0 images"):
        processor.training_example(ONE_TURN)
    with pytest.raises(ValueError, match="role 'user' or 'assistant'"):
        processor.training_example([{"role": "system", "content": "x"}])
    image = Image.new("RGB", (100, 60))
    fits = processor.training_length(ONE_TURN, [image.size], 3)  # hd_num 2 and 3 both give 1 x 2 crops
    length = len(processor.training_example(ONE_TURN, [image], hd_num=4)["input_ids"])  # 2 x 2 crops
    assert length > fits
    with pytest.raises(ValueError, match=rf"is {length} ids long, more than max_length={fits} .*; hd_num=3 fits"):
        processor.training_example(ONE_TURN, [image], hd_num=4, max_length=fits)
    with pytest.raises(ValueError, match="even hd_num=1 does not fit"):
        processor.training_example(ONE_TURN, [image], hd_num=4, max_length=20)


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return path


def sample(index, question, answer, images=()):
    return {
        "id": str(index),
        "image": list(images),
        "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
    }


def test_data_txt_mixes_sources_with_their_own_hd_num(folder, processor, tmp_path):
    write_json(tmp_path / "a.json", [sample(0, "<ImageHere>Colour?", "Red.", [str(folder / "red.png")])])
    write_json(tmp_path / "b.json", [sample(i, f"Text {i}?", "Yes.") for i in range(4)])
    (tmp_path / "data.txt").write_text("# mix\na.json 0.003 1\nb.json 0.002\n\n")
    sources = data.read_sources(tmp_path / "data.txt")
    assert [(s.path.name, s.num_samples, s.hd_num) for s in sources] == [("a.json", 3, 1), ("b.json", 2, None)]
    dataset = data.ConversationDataset(processor, sources, max_length=512, hd_num=9, seed=0)
    assert len(dataset) == 5  # 3 draws of the one image sample (repeated) + 2 of the 4 text samples
    grids = [dataset[i]["image_grids"].tolist() for i in range(3)]
    assert grids == [[[1, 1]]] * 3  # hd_num 1 from data.txt, not the default 9
    texts = [processor.tokenizer.decode(dataset[i]["input_ids"]) for i in (3, 4)]
    assert len(set(texts)) == 2
    again = data.ConversationDataset(processor, sources, max_length=512, hd_num=9, seed=0)
    assert [again[i]["input_ids"].tolist() for i in (3, 4)] == [dataset[i]["input_ids"].tolist() for i in (3, 4)]


def test_draw_repeats_whole_passes_then_samples_the_rest():
    import random

    picks = data.draw(4, 10, random.Random(0))
    assert picks[:8] == [0, 1, 2, 3] * 2 and len(set(picks[8:])) == 2
    assert data.draw(4, None, random.Random(0)) == [0, 1, 2, 3]


def test_over_long_samples_are_dropped_and_counted(folder, processor, tmp_path, caplog):
    long_text = "The quick brown fox jumps over the lazy dog. " * 20
    samples = [sample(0, "Short?", "Yes."), sample(1, long_text, "No."), sample(2, "<ImageHere>Hi", "Red.", ["red.png"])]
    path = write_json(folder / "mixed.json", samples)
    with caplog.at_level(logging.WARNING):
        dataset = data.ConversationDataset(processor, data.read_sources(path), max_length=120, hd_num=4)
    assert len(dataset) == 2
    assert "Dropped 1 of 3 samples longer than max_length=120" in caplog.text
    assert all(len(dataset[i]["input_ids"]) <= 120 for i in range(2))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (sample(7, "<ImageHere>Hi", "Yes.", ["missing.png"]), FileNotFoundError, "id '7'.*missing.png does not exist"),
        ({"id": "8", "conversations": [{"from": "gpt", "value": "x"}]}, ValueError, "id '8'.*'from' in"),
        (sample(9, "<ImageHere><ImageHere>Hi", "Yes.", ["red.png"]), ValueError, "id '9'.*2 <ImageHere> but 1"),
        (sample(10, "Hi", "Yes.", ["red.png"]), ValueError, "id '10'.*0 <ImageHere> but 1"),
    ],
)
def test_bad_samples_are_named_when_the_dataset_is_built(folder, processor, bad, error, message):
    path = write_json(folder / "bad.json", [sample(0, "Fine?", "Yes."), bad])
    with pytest.raises(error, match=message):
        data.ConversationDataset(processor, data.read_sources(path), max_length=512, hd_num=4)


@pytest.mark.parametrize("line", ["a.json", "a.json x", "a.json 0", "a.json 1 2 3"])
def test_malformed_data_txt_lines_raise(tmp_path, line):
    (tmp_path / "data.txt").write_text(line + "\n")
    with pytest.raises(ValueError, match="data.txt:1"):
        data.read_sources(tmp_path / "data.txt")


def test_mixed_batch_rows_equal_single_rows_through_the_model(folder, processor):
    """Right-padded batch of an image sample with two images, a text-only sample and a one-image sample: every
    row's logits and loss equal the sample alone."""
    two_images = [
        {"role": "user", "content": "<ImageHere>and<ImageHere>: which is red?"},
        {"role": "assistant", "content": "The first."},
    ]
    examples = [
        dict(processor.training_example(two_images, [folder / "red.png", folder / "blue.png"], hd_num=3)),
        dict(processor.training_example(TWO_TURNS)),
        dict(processor.training_example(ONE_TURN, [folder / "blue.png"], hd_num=2)),
    ]
    batch = data.DataCollator(processor.tokenizer.pad_token_id)(examples)
    length = max(len(example["input_ids"]) for example in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, length)
    assert batch["attention_mask"].sum(1).tolist() == [len(example["input_ids"]) for example in examples]
    assert batch["image_grids"].shape == (3, 2)
    assert torch.equal(batch["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[2]["pixel_values"]]))
    assert (batch["labels"][1, len(examples[1]["input_ids"]) :] == IGNORE).all()

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    with torch.no_grad():
        batched = model(**batch)
        losses = []
        for row, example in enumerate(examples):
            single = model(**data.DataCollator(processor.tokenizer.pad_token_id)([example]))
            size = len(example["input_ids"])
            assert (batched.logits[row, :size] - single.logits[0]).abs().max() < 1e-5
            losses.append((single.loss, int((example["labels"][1:] != IGNORE).sum())))
    token_mean = sum(loss * count for loss, count in losses) / sum(count for _, count in losses)
    assert abs(batched.loss - token_mean) < 1e-5


@pytest.mark.parametrize("hd_num", [0, -3, 2.5, "9"])
def test_bad_hd_num_is_refused_even_without_images(processor, hd_num):
    with pytest.raises(ValueError, match="hd_num must be"):
        processor(processor.build_prompt("Hello"), hd_num=hd_num)
    with pytest.raises(ValueError, match="hd_num must be"):
        processor.training_length(TWO_TURNS, [], hd_num)
    with pytest.raises(ValueError, match="hd_num must be"):
        processor.training_example(TWO_TURNS, hd_num=hd_num)
