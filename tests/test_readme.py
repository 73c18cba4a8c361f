"""The README and docs/ as a user meets them: every ```python block of README.md runs as written against a tiny random
model, every link points at a file of this repository, no file cites a document the repository lacks, and
`token_budget` answers what the README says it does.

How a README block is run (the rules for every block, including ones added later):
- Blocks run in order in one namespace, like the cells of a notebook: a block may use what an earlier one defined.
- `path` names the model folder. It is defined before the first block, and a line `path = "..."` in a block is
  rewritten to the tiny model's folder; nothing else in the block changes.
- The string literal "cuda" becomes "cpu", as the tests have no GPU: write a device as the literal "cuda".
- An image file a block names as a string literal ("doc.png", "a.jpg") exists in the working directory: a small copy
  of assets/sample_4k.png, written under that name before the blocks run.
A snippet that cannot run on a CPU under these rules belongs in docs/ or in a ```bash block.
"""

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, load_file

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PATH_ASSIGNMENT = re.compile(r"^(\s*)path = (['\"]).*?\2", re.MULTILINE)
IMAGE_LITERAL = re.compile(r"['\"]([\w./-]+\.(?:png|jpe?g|webp))['\"]")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Words that point at things a user of this repository cannot see: the project's former notes and its issue tracker.
INTERNAL = re.compile(r"\bSPEC\b|reference/SPEC|\b[Ii]ssue #?\d+|\bthe issue's|H100 targets|\bworkplace\b|device tool|GPU loan")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".jinja", ".toml", ".cfg", ".yaml", ".yml"}


def python_blocks(markdown: Path) -> list[tuple[int, str]]:
    """`(line number, code)` of each ```python block."""
    text = markdown.read_text()
    return [(text.count("\n", 0, match.start()) + 2, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random model of `make demo` (scripts/chat.py), as `make demo KEEP=DIR` leaves it."""
    return load_file("scripts/chat.py").build_tiny_model_dir(tmp_path_factory.mktemp("readme_model"))


def test_readme_is_a_model_card():
    front_matter = README.read_text().split("---\n")[1]
    assert "pipeline_tag: image-text-to-text" in front_matter.splitlines()
    assert "library_name: transformers" in front_matter.splitlines()


def test_every_python_block_of_the_readme_runs(tiny_model_dir, tmp_path, monkeypatch):
    blocks = python_blocks(README)
    assert len(blocks) >= 2, "the README lost its quick start"
    monkeypatch.chdir(tmp_path)
    sample = Image.open(ROOT / "assets" / "sample_4k.png").convert("RGB")
    sample = sample.resize((sample.width // 10, sample.height // 10))
    for name in {name for _, code in blocks for name in IMAGE_LITERAL.findall(code)}:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        sample.save(tmp_path / name)

    namespace = {"__name__": "__readme__", "path": str(tiny_model_dir)}
    for line, code in blocks:
        code = PATH_ASSIGNMENT.sub(lambda match: f"{match.group(1)}path = {str(tiny_model_dir)!r}", code)
        code = code.replace('"cuda"', '"cpu"').replace("'cuda'", "'cpu'")
        torch.manual_seed(0)
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)  # noqa: S102 - the test's purpose
    assert namespace["path"] == str(tiny_model_dir), "a block changed `path` in a way the test does not rewrite"


def test_readme_blocks_name_the_model_folder_only_through_path():
    for line, code in python_blocks(README):
        for match in re.finditer(r"Auto\w+\.from_pretrained\(([^,)]+)", code):
            assert match.group(1).strip() == "path", f"README.md, block at line {line}: {match.group(0)}"


@pytest.mark.parametrize("markdown", [README, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_links_point_at_files_of_this_repository(markdown):
    for target in LINK.findall(markdown.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        file = (markdown.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{markdown.relative_to(ROOT)} links to {target}, which is not in the repository"
        assert ROOT in file.parents or file == ROOT, f"{markdown.relative_to(ROOT)} links outside it: {target}"


def repository_text_files() -> list[Path]:
    """The code, docs and configuration a clone holds (not virtualenvs, caches, outputs or the checkpoint fixtures)."""
    files = []
    for file in sorted(ROOT.rglob("*")):
        parts = file.relative_to(ROOT).parts
        hidden = any(part.startswith(".") and part != ".ci" for part in parts)
        skipped = hidden or parts[0] == "out" or "__pycache__" in parts or parts[:2] == ("tests", "fixtures")
        if file.is_file() and not skipped and (file.suffix in TEXT_SUFFIXES or file.name in ("Makefile", "run")):
            files.append(file)
    return files


def test_no_file_cites_a_document_the_repository_lacks():
    """Code comments cite docs/model.md sections; nothing names the project's former notes or its issue numbers."""
    this_test = Path(__file__).resolve()
    hits = [
        f"{file.relative_to(ROOT)}:{number}: {line.strip()}"
        for file in repository_text_files()
        if file != this_test
        for number, line in enumerate(file.read_text(errors="replace").splitlines(), start=1)
        if INTERNAL.search(line)
    ]
    assert hits == [], "\n".join(hits)


def test_docs_index_lists_every_docs_file():
    index = (ROOT / "docs" / "README.md").read_text()
    listed = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    assert {doc.name for doc in DOCS} - {"README.md"} <= listed


def test_model_doc_keeps_the_section_numbers_the_code_cites():
    headings = re.findall(r"^## (\d+)\. (.+)$", (ROOT / "docs" / "model.md").read_text(), re.MULTILINE)
    assert [int(number) for number, _ in headings][:8] == list(range(1, 9))


def test_token_budget_through_auto_processor(tiny_processor):
    """`processor.image_processor.token_budget` gives the grid and the placeholder count the processor writes."""
    image_processor = tiny_processor.image_processor
    # 2 tokens per tile side (56 / 14 / 2): 2**2 * (4 * 6 + 1) + 1 + 2 * (4 + 1) = 111; 3661 at 336 px tiles
    assert image_processor.token_budget(1920, 1080, 25) == (4, 6, 111)
    for width, height, hd_num in [(1920, 1080, 25), (300, 900, 9), (640, 480, None)]:
        rows, cols, num_tokens = image_processor.token_budget(width, height, hd_num)
        image = Image.new("RGB", (width, height), "white")
        inputs = tiny_processor("<ImageHere>What is it?", images=[image], hd_num=hd_num)
        assert inputs["image_grids"].tolist() == [[rows, cols]]
        assert int((inputs["input_ids"] == tiny_processor.image_token_id).sum()) == num_tokens
    assert image_processor.token_budget(640, 480) == image_processor.token_budget(640, 480, image_processor.hd_num)
    with pytest.raises(ValueError, match="hd_num"):
        image_processor.token_budget(640, 480, 0)
