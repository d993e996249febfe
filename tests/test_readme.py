"""README.md states facts that the code must keep true."""

import re
from pathlib import Path

from rtdlm.model import PRESETS, non_embedding_params, param_count, preset

README = Path("README.md").read_text()


def test_readme_starts_with_the_two_setup_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.DOTALL)
    assert block is not None and README.index("```bash") < README.index("\n## ")
    assert block.group(1).split("\n")[:2] == [
        "./pants run apps/trainer -- --preset tiny",
        "./pants test ::",
    ]


def test_preset_table_is_the_code() -> None:
    rows = {
        m["name"]: (int(m["non_embedding"].replace(",", "")), int(m["total"].replace(",", "")))
        for m in re.finditer(
            r"^\| (?P<name>\w+) \|.*\| (?P<non_embedding>[\d,]+) \| (?P<total>[\d,]+) \|$",
            README,
            re.MULTILINE,
        )
    }
    assert set(rows) == set(PRESETS)
    for name, (non_embedding, total) in rows.items():
        cfg = preset(name, vocab_size=256)
        assert (non_embedding, total) == (non_embedding_params(cfg), param_count(cfg)), name


DOCS = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
GOALS = {"run", "test", "package", "lint", "check", "fmt", "fix", "tailor", "publish", "list"}
GOALS |= {"generate-lockfiles", "update-build-files", "dependencies", "export"}


def pants_addresses(text: str) -> list[str]:
    """The target addresses of every `./pants GOAL ... [-- ARGS]` a page shows."""
    found = []
    for command in re.findall(r"\./pants ([^`\n]*)", text):
        for token in command.split(" #")[0].split(" -- ")[0].split():
            if token.startswith("-") or "<" in token or token in GOALS:
                continue  # an option, a placeholder or a goal
            found.append(token.strip("\"'"))
    return found


def names_a_real_target(address: str) -> bool:
    path, _, name = address.lstrip("/").partition(":")
    if address.endswith("::"):
        return Path(path.rstrip(":") or ".").is_dir()
    build = Path(path or ".") / "BUILD"
    if not build.is_file():
        return False
    text = build.read_text()
    if name:
        return f'name="{name}"' in text
    # a directory's default target: named after it, or a target given no name
    unnamed = re.search(r"^\w+\((?![^)]*\bname=)", text, re.MULTILINE)
    return f'name="{Path(path).name}"' in text or unnamed is not None


def test_every_pants_command_the_docs_show_names_a_real_target() -> None:
    shown = {str(page): pants_addresses(page.read_text()) for page in DOCS}
    assert sum(map(len, shown.values())) > 30  # the parser still finds the commands
    missing = [(page, a) for page, addresses in shown.items() for a in addresses]
    missing = [(page, a) for page, a in missing if not names_a_real_target(a)]
    assert not missing


def test_the_docs_index_links_every_page() -> None:
    for page in Path("docs").glob("*.md"):
        assert f"(docs/{page.name})" in README, page
