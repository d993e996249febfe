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
