"""Which files a corpus path means: a file, a folder or a glob, resolved to shards.

A shard is one file, the unit of streaming, retry, resume, sweep fingerprints and prefilter
indexes. In a folder (searched recursively) every file must be a corpus file
(:data:`attribution.data.formats.SUPPORTED`): anything else is an error that names it,
never skipped, except names starting with ``.`` or ``_`` (hidden files, half-written
temporaries, ``_SUCCESS`` markers), which are not data by the convention pyarrow's dataset
discovery follows too. A Hugging Face ``save_to_disk`` folder (``state.json`` beside
``dataset_info.json``) contributes its Arrow files, in the dataset's order, read through
``datasets.load_from_disk``; a saved ``DatasetDict`` (``dataset_dict.json``) its one split.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

from attribution.data.bad_input import DataError
from attribution.data.formats import SUPPORTED, file_kind, is_empty

SAVED_DATASET_FILES = frozenset({"state.json", "dataset_info.json"})
SAVED_DICT_FILE = "dataset_dict.json"
_GLOB_CHARS = frozenset("*?[")


def list_shards(path: str | Path) -> list[Path]:
    """Resolve a file, a folder or a glob to its shard files; DataError if there are none with a row.

    A file named explicitly or matched by a glob must be a corpus file; a folder matched by a
    glob counts as that folder. Shards are sorted by path (a saved dataset's in its own order).
    An empty shard is allowed (it is recorded as a skip when read); a corpus whose every
    shard is empty is an error. Shards are opened only until one with a row is found (usually
    the first), so listing a large corpus stays cheap.
    """
    text = str(path)
    path = Path(path)
    if path.is_dir():
        shards = list(_folder_shards(path))
        if not shards:
            raise DataError(f"{path}: folder holds no corpus files; expected {SUPPORTED}")
    elif path.is_file():
        shards = [_corpus_file(path)]
    elif _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not matches:
            raise DataError(f"{text}: glob matches no files")
        shards = [shard for match in matches for shard in (_folder_shards(match) if match.is_dir() else [_corpus_file(match)])]
    else:
        raise DataError(f"{path}: no such file or directory")
    shards = list(dict.fromkeys(shards))
    if all(_surely_empty(shard) for shard in shards):
        raise DataError(f"{text}: the corpus is empty: none of its {len(shards)} file(s) holds a row")
    return shards


def _surely_empty(shard: Path) -> bool:
    """Empty, as far as a look at its start tells; an unreadable file is reported where it is read."""
    try:
        return is_empty(shard)
    except DataError:
        return False


def _corpus_file(path: Path) -> Path:
    if file_kind(path) is None:
        raise DataError(f"{path}: not a corpus file; expected {SUPPORTED}")
    return path


def _folder_shards(folder: Path) -> Iterator[Path]:
    entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith((".", "_")))
    names = {entry.name for entry in entries}
    if SAVED_DICT_FILE in names:
        yield from _saved_dict_shards(folder, entries)
        return
    if "state.json" in names:
        yield from _saved_dataset_shards(folder, entries)
        return
    for entry in entries:
        if entry.is_dir():
            yield from _folder_shards(entry)
        elif file_kind(entry) is not None:
            yield entry
        else:
            raise DataError(
                f"{entry}: not a corpus file (expected {SUPPORTED}): move it out of {folder}, "
                "or point data.path at a glob of the data files"
            )


def _saved_dataset_shards(folder: Path, entries: list[Path]) -> Iterator[Path]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, as ``datasets`` lists them."""
    import datasets  # about 1.5 s to import: only for saved datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises many kinds (FileNotFoundError, JSON, KeyError, ...)
        raise DataError(f"{folder}: not a readable save_to_disk folder ({type(error).__name__}: {error})") from error
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{folder}: a saved DatasetDict without {SAVED_DICT_FILE}; point data.path at one split's folder")
    shards = [folder / Path(entry["filename"]).name for entry in dataset.cache_files]
    expected = SAVED_DATASET_FILES | {shard.name for shard in shards}
    for entry in entries:
        if entry.name not in expected:
            raise DataError(
                f"{entry}: not part of the saved dataset in {folder} (its state.json lists "
                f"{', '.join(sorted(s.name for s in shards))}); move it out of the folder"
            )
    yield from shards


def _saved_dict_shards(folder: Path, entries: list[Path]) -> Iterator[Path]:
    """A ``DatasetDict.save_to_disk`` folder: its one split, or an error naming the splits."""
    splits = sorted(entry.name for entry in entries if entry.is_dir())
    if len(splits) != 1:
        raise DataError(
            f"{folder}: a saved DatasetDict with splits {', '.join(splits)}; point data.path at one of them "
            f"({folder / splits[0]} for example)" if splits else f"{folder}: a saved DatasetDict with no split"
        )
    others = [entry for entry in entries if entry.is_file() and entry.name != SAVED_DICT_FILE]
    if others:
        raise DataError(f"{others[0]}: not part of the saved DatasetDict in {folder}; move it out of the folder")
    split = folder / splits[0]
    yield from _saved_dataset_shards(split, sorted(e for e in split.iterdir() if not e.name.startswith((".", "_"))))
