"""Where inputs and outputs live: local paths, or object storage by URI.

`s3://`, `gs://` and `az://` (also `abfs://`) resolve to pyarrow's native
filesystems and `hf://` (input only) to huggingface_hub's fsspec filesystem.
Credentials come from each service's usual environment variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
`AWS_ENDPOINT_URL` for S3-compatible servers; `GOOGLE_APPLICATION_CREDENTIALS`;
`AZURE_STORAGE_ACCOUNT_NAME` / `AZURE_STORAGE_ACCOUNT_KEY`; `HF_TOKEN`), which both
pyarrow and polars read themselves, so no secret passes through this module.
A local path is returned unchanged everywhere: local runs behave exactly as before.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from pipeline.errors import SpecError

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "hf")
INPUT_ONLY_SCHEMES = ("hf",)


def is_remote(location: str | Path) -> bool:
    """True for an object-storage URI (`s3://bucket/key` and the like)."""
    if isinstance(location, Path):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def scheme_of(uri: str) -> str:
    return uri.partition("://")[0].lower()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `uri` and the path inside it."""
    scheme = scheme_of(uri)
    try:
        if scheme == "hf":
            return _huggingface(), uri.partition("://")[2]
        if scheme in ("az", "abfs", "abfss"):
            return _azure(uri)
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, ImportError) as exc:
        raise SpecError(f"cannot open {uri}: {_short(exc)}") from None


def _huggingface() -> pafs.FileSystem:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise SpecError("hf:// paths need huggingface_hub: pip install huggingface_hub") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem()))


def _azure(uri: str) -> tuple[pafs.FileSystem, str]:
    # az://container/path (the account comes from the environment, as polars reads it)
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get(
        "AZURE_STORAGE_ACCOUNT"
    )
    if not account:
        raise SpecError(f"{uri}: set AZURE_STORAGE_ACCOUNT_NAME to the storage account's name")
    key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    rest = uri.partition("://")[2]
    return pafs.AzureFileSystem(account_name=account, account_key=key), rest.split("@")[0]


def expand(pattern: str, what: str = "input.path") -> list[str]:
    """The files a remote path or glob names, sorted; SpecError when there are none."""
    fs, path = filesystem(pattern)
    prefix = pattern[: len(pattern) - len(path)] if pattern.endswith(path) else ""
    if not glob.has_magic(path):
        info = _info(fs, path, pattern, what)
        if info.type == pafs.FileType.NotFound:
            raise SpecError(f"{what}: file not found: {pattern}")
        if info.type == pafs.FileType.Directory:
            raise SpecError(f"{what}: {pattern} is a folder; name a file or a glob like dir/*.csv")
        return [pattern]
    base = _static_prefix(path)
    try:
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise SpecError(f"{what}: cannot list {pattern}: {_short(exc)}") from None
    matches = sorted(
        info.path
        for info in found
        if info.type == pafs.FileType.File and _matches(info.path.split("/"), path.split("/"))
    )
    if not matches:
        raise SpecError(f"{what}: no file matches '{pattern}'")
    return [prefix + match for match in matches]


def _matches(parts: list[str], patterns: list[str]) -> bool:
    """Glob semantics: `*` stays within one path segment, `**` spans any number."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_matches(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], patterns[0])
        and _matches(parts[1:], patterns[1:])
    )


def _static_prefix(path: str) -> str:
    parts: list[str] = []
    for part in path.split("/"):
        if glob.has_magic(part):
            break
        parts.append(part)
    return "/".join(parts)


def _info(fs: pafs.FileSystem, path: str, uri: str, what: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise SpecError(f"{what}: cannot read {uri}: {_short(exc)}") from None


def suffix(location: str | Path) -> str:
    """The file extension, lower-cased, of a local path or a URI."""
    return PurePosixPath(str(location)).suffix.lower()


def open_input(location: str | Path) -> object:
    """Something pyarrow.parquet.ParquetFile can read: a local path, or a remote file handle."""
    if not is_remote(location):
        return location
    fs, path = filesystem(str(location))
    return fs.open_input_file(path)


def signature(location: str | Path) -> tuple[int, int]:
    """(size, modification time in ns) of a file: changes when the file does."""
    if not is_remote(location):
        stat = Path(location).stat()
        return stat.st_size, stat.st_mtime_ns
    fs, path = filesystem(str(location))
    info = fs.get_file_info(path)
    return info.size or 0, info.mtime_ns or 0


def local_stage(uri: str) -> Path:
    """The local file a run builds a remote output in before uploading it.

    Its run folder (checkpoint and run log) sits beside it, so rerunning the same job
    on the same machine resumes. The folder can be moved with PIPELINE_STAGE_DIR.
    """
    root = Path(os.environ.get("PIPELINE_STAGE_DIR") or Path.home() / ".cache" / "pipeline")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    name = PurePosixPath(uri.partition("://")[2]).name or "output.parquet"
    return root / "outputs" / f"{scheme_of(uri)}-{digest}" / name


def check_writable(uri: str, what: str = "output.path") -> None:
    """Refuse an output URI that cannot be written, before anything is sent."""
    scheme = scheme_of(uri)
    if scheme in INPUT_ONLY_SCHEMES:
        raise SpecError(f"{what}: {scheme}:// is read-only here; write to s3://, gs:// or az://")
    fs, path = filesystem(uri)
    probe = f"{path.rstrip('/')}.pipeline-write-test"
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        raise SpecError(f"{what}: cannot write to {uri} ({_short(exc)})") from None


def upload(local: Path, uri: str) -> None:
    """Copy a finished local file to `uri`; an object appears only once it is complete."""
    fs, path = filesystem(uri)
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
