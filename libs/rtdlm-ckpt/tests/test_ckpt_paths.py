"""Paths that are URLs are refused before anything is read or written."""

import argparse
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtdlm.ckpt import NotALocalPathError, local_path


@pytest.mark.parametrize(
    "url", ["s3://runs/a", "gs://bucket/prefix/run", "S3://B/x", "http://host/x", "file:///tmp/x"]
)
def test_a_url_is_refused_naming_its_scheme_and_the_fix(url: str) -> None:
    with pytest.raises(NotALocalPathError) as refused:
        local_path(url)
    scheme = url.split("://")[0]
    assert str(refused.value) == (
        f"{url} is a URL, and {scheme}:// storage is not supported: nothing was read or "
        "written; pass a local or mounted folder (a bucket mounted with s3fs or gcsfuse works)"
    )


def is_url(text: str) -> bool:
    """RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), then "://"."""
    scheme, sep, _ = text.partition("://")
    ascii_letters = string.ascii_letters
    allowed = set(ascii_letters + string.digits + "+-.")
    return bool(sep) and scheme[:1] in set(ascii_letters) and set(scheme) <= allowed


@given(
    st.text(alphabet=st.sampled_from("sg3:/.+-_aZé ~"), max_size=16)
    | st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40)
)
def test_exactly_the_urls_are_refused_and_anything_else_is_the_path_it_names(text: str) -> None:
    if is_url(text):
        with pytest.raises(NotALocalPathError):
            local_path(text)
    else:
        assert local_path(text) == Path(text)


@pytest.mark.parametrize("path", ["runs/s3:/x", "./s3://x", "a:b/c", "/mnt/gcs/run"])
def test_paths_that_only_look_alike_are_kept(path: str) -> None:
    assert local_path(path) == Path(path)


def test_argparse_prints_the_refusal_as_its_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--run-dir", type=local_path)
    with pytest.raises(SystemExit) as ended:
        parser.parse_args(["--run-dir", "s3://runs/a"])
    assert ended.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("tool: error: argument --run-dir: s3://runs/a is a URL, and s3://")
