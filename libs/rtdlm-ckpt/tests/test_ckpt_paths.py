"""Where a path must be local, any URL is refused; where it may be on object storage, s3:// and
gs:// pass and every other URL is refused; both before anything is read or written."""

import argparse
import os
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtdlm.ckpt import NotALocalPathError, StoragePathError, kvstore, local_path, storage_path


@pytest.mark.parametrize(
    "url", ["s3://runs/a", "gs://bucket/prefix/run", "S3://B/x", "http://host/x", "file:///tmp/x"]
)
def test_a_url_is_refused_naming_its_scheme_and_the_fix(url: str) -> None:
    with pytest.raises(NotALocalPathError) as refused:
        local_path(url)
    assert str(refused.value) == (
        f"{url} is a URL, and this takes a folder on this machine: nothing was read or "
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
    assert last.startswith("tool: error: argument --run-dir: s3://runs/a is a URL, and this")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("s3://runs/a", "s3://runs/a"),
        ("gs://bucket/prefix/run/", "gs://bucket/prefix/run"),
        ("s3://b//x//", "s3://b/x"),
    ],
)
def test_object_storage_is_kept_as_a_url(path: str, expected: str) -> None:
    assert str(storage_path(path)) == expected


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("hdfs://nn/runs", "hdfs:// storage is not supported"),
        ("S3://B/x", "S3:// storage is not supported"),
        ("file:///tmp/x", "file:// storage is not supported"),
        ("s3://bucket", "names no folder in a bucket"),
        ("gs:///prefix", "names no folder in a bucket"),
    ],
)
def test_other_storage_is_refused_naming_the_fix(path: str, problem: str) -> None:
    with pytest.raises(StoragePathError) as refused:
        storage_path(path)
    assert problem in str(refused.value)
    assert "nothing was read or written; pass " in str(refused.value)


@given(st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40))
def test_a_local_path_is_made_absolute_and_kept(text: str) -> None:
    if is_url(text):
        return
    assert str(storage_path(text)) == os.path.abspath(text)


def test_the_s3_driver_takes_the_endpoint_and_keys_from_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("RTDLM_S3_RETRIES", raising=False)
    retries = {"max_retries": 6, "initial_delay": "1s", "max_delay": "10s"}
    assert kvstore("s3://b/runs/a") == {
        "driver": "s3",
        "bucket": "b",
        "path": "runs/a",
        "s3_request_retries": retries,
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    assert kvstore("s3://b/runs/a") == {
        "driver": "s3",
        "bucket": "b",
        "path": "runs/a",
        "s3_request_retries": retries,
        "endpoint": "http://minio:9000",
        "aws_region": "eu-west-1",
        "aws_credentials": {"type": "environment"},
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:9000")  # the service's own wins
    assert kvstore("s3://b/x")["endpoint"] == "http://s3-only:9000"
    assert kvstore("gs://b/runs/a") == {"driver": "gcs", "bucket": "b", "path": "runs/a"}
    monkeypatch.setenv("RTDLM_S3_RETRIES", "2")
    assert kvstore("s3://b/x")["s3_request_retries"]["max_retries"] == 2
