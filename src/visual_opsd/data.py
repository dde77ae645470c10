"""Datasets on disk: the native JSONL format, ThinkMorph parquet and VSP folders, with validation.

Formats `load_dataset` understands (it picks one from the path):

- **native** (what `visual-opsd data make` writes): a folder holding `data.jsonl` and the image
  files it names, paths relative to the JSONL (`images/{id}_problem_0.png`, `images/{id}_vt_0.png`).
  One JSON object per line; see `FIELDS` for the schema. A `.jsonl` file path works too.
- **ThinkMorph parquet** (HF datasets ThinkMorph/Spatial_Navigation etc.): a `.parquet` file, or a
  folder of them (searched recursively, sorted by path). Columns `pid`, `question`, `answer`,
  `task`, `full_text_only_thought`, images `problem_image_k` / `reasoning_image_k` (HF Image
  structs `{"bytes", "path"}`) and thoughts `resoning_thought_k` (sic; `reasoning_thought_k` is
  accepted too). Read row group by row group, never the whole file at once.
- **VSP** upstream folder `level{L}/{img,table,pure_text}/{i}.*`, via `visual_opsd.vsp`.
- **VLMEvalKit TSV** benchmark files (`.tsv`: MMVP, SAT, BLINK, CV-Bench, ...), via `visual_opsd.vlmeval`.

Every row goes through the same checks (`validate_rows`): JSON and types, required fields, empty
text, image files that exist, stay inside the dataset folder and decode, at most `max_vts` VTs,
n VTs with n + 1 thoughts, unique ids, and the task's own `validate`. Loaders raise `DataError`
(naming file, row and field) on the first bad row, or skip bad rows with `skip_invalid=True` and
report them on the returned `LoadedSamples`. Writing is atomic: a dataset folder is either the old
one or the complete new one, never half written.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from visual_opsd.errors import DataError
from visual_opsd.images import checked_image_path, decode_image, image_path_problem, inside_root
from visual_opsd.sample import Sample

logger = logging.getLogger(__name__)

NATIVE_FILE = "data.jsonl"
IMAGE_DIR = "images"

# Native row schema: field -> (JSON types allowed, required). Lists hold strings only.
FIELDS: dict[str, tuple[str, bool]] = {
    "id": ("str", True),
    "task": ("str", False),  # "" when absent: then no task-specific validation
    "question": ("str", True),
    "answer": ("str", True),  # bare answer: "R,D" or "B", never wrapped in <answer> / \boxed{}
    "problem_images": ("list[str]", False),  # image paths relative to data.jsonl
    "vt_images": ("list[str]", False),  # visual thoughts, in order
    "thoughts": ("list[str]", False),  # n VTs -> n + 1 thoughts (or none)
    "text_only_trace": ("str|null", False),
    "choices": ("list[str]|null", False),  # multiple-choice options in letter order
    "metadata": ("object", False),
}

# ThinkMorph task names -> ours. Spatial_Navigation is our maze; Visual_Search and Jigsaw_Assembly
# are multiple choice with the options written into the question ("(A) ..."; ThinkMorph's
# Jigsaw_Assembly is not our generated jigsaw, whose pieces and options differ); Chart_Refocus is a
# short answer with ChartQA's relaxed accuracy.
THINKMORPH_TASKS = {
    "spatial_navigation": "maze", "spatialnavigation": "maze", "navigation": "maze", "maze": "maze",
    "visual_search": "multiple_choice", "jigsaw_assembly": "multiple_choice", "chart_refocus": "short_answer",
}

_PROBLEM_IMAGE = re.compile(r"^problem_image_(\d+)$")
_REASONING_IMAGE = re.compile(r"^reasoning_image_(\d+)$")
_THOUGHT = re.compile(r"^(?:resoning|reasoning)_thought_(\d+)$")  # ThinkMorph spells it "resoning"
_PARQUET_SCALARS = ("pid", "question", "answer", "task", "full_text_only_thought")
_PARQUET_BATCH_ROWS = 32  # rows decoded at a time: bounds memory on files with large images
# Memory bounds on hostile input: an image header is checked before its pixels are decoded (a
# 100,000 x 100,000 PNG is a few hundred bytes on disk and 30 GB decoded: `images.MAX_IMAGE_PIXELS`);
# a JSONL line is read at most this long. Both fail the row with a located error, never the process.
MAX_LINE_BYTES = 64 * 1024 * 1024
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters other than \t \n \r


@dataclass(frozen=True)
class RowError:
    """One problem with one row: `row_id` is the sample id when readable, else `line N` / `row N`."""

    row_id: str
    field: str
    reason: str
    file: str | None = None

    def __str__(self) -> str:
        return f"row {self.row_id}: {self.field}: {self.reason}"


class LoadedSamples(list[Sample]):
    """The samples of a dataset (a plain `list[Sample]`), plus what was skipped.

    `errors` lists every problem of every skipped row; `n_skipped` counts the rows. Slicing returns
    a plain list without these attributes.
    """

    def __init__(self, samples: Iterable[Sample] = (), source: str = "") -> None:
        super().__init__(samples)
        self.source = source
        self.errors: list[RowError] = []
        self.n_skipped = 0

    def skipped_summary(self, limit: int = 5) -> str:
        """E.g. `skipped 3 invalid rows in d/: row a: question: empty; ...` ('' when none)."""
        if not self.n_skipped:
            return ""
        shown = "; ".join(str(e) for e in self.errors[:limit])
        more = f"; ... ({len(self.errors) - limit} more problems)" if len(self.errors) > limit else ""
        return f"skipped {self.n_skipped} invalid row{'s' * (self.n_skipped != 1)} in {self.source}: {shown}{more}"


# ---------------------------------------------------------------------------------------------
# Public entry points


def dataset_format(path: str | os.PathLike) -> str:
    """The format of the dataset at `path`: "native", "parquet", "tsv" or "vsp" (`DataError` if none)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such dataset: {p}")
    if p.is_file():
        if p.suffix == ".jsonl":
            return "native"
        if p.suffix == ".parquet":
            return "parquet"
        if p.suffix == ".tsv":
            return "tsv"
        raise DataError("not a dataset file (expected .jsonl, .parquet or a VLMEvalKit .tsv)", file=p)
    if (p / NATIVE_FILE).is_file():
        return "native"
    if any(d.is_dir() and (d / "table").is_dir() for d in p.glob("level*")):
        return "vsp"
    if next(p.rglob("*.parquet"), None) is not None:
        return "parquet"
    raise DataError(f"folder holds no {NATIVE_FILE}, no .parquet files and no VSP level*/table folders", file=p)


def load_dataset(
    path: str | os.PathLike, *, max_vts: int = 8, skip_invalid: bool = False, allow_outside: bool = False
) -> LoadedSamples:
    """All samples at `path` (native folder / .jsonl, ThinkMorph parquet file or folder, VSP folder).

    Images are decoded and converted to RGB. A bad row raises `DataError` naming file, row and field;
    with `skip_invalid=True` bad rows are left out, logged as a warning, and reported on the result
    (`result.n_skipped`, `result.errors`, `result.skipped_summary()`). `allow_outside` permits image
    paths that leave the dataset folder (absolute, with `..`, or through a symbolic link; for VSP
    folders, tables and images linked from outside).
    """
    out = LoadedSamples(source=str(path))
    for sample, errors in _scan(Path(path), max_vts=max_vts, allow_outside=allow_outside):
        if errors:
            if not skip_invalid:
                first = errors[0]
                raise DataError(
                    f"{first.reason} (run `visual-opsd data validate {path}` to list every bad row, "
                    "or load with skip_invalid=True)",
                    file=first.file,
                    row=first.row_id,
                    field=first.field,
                )
            out.errors.extend(errors)
            out.n_skipped += 1
        elif sample is not None:
            out.append(sample)
    if out.n_skipped:
        logger.warning(out.skipped_summary())
    return out


def validate_rows(path: str | os.PathLike, *, max_vts: int = 8, allow_outside: bool = False) -> list[RowError]:
    """Every problem of every row at `path` (empty when all rows are valid)."""
    found: list[RowError] = []
    for _, errors in _scan(Path(path), max_vts=max_vts, allow_outside=allow_outside):
        found.extend(errors)
    return found


def validate_command(path: str | os.PathLike, max_vts: int = 8) -> int:
    """`visual-opsd data validate PATH`: one line per bad row, a summary; exit 1 if any row is bad.

    Exit 2 when the path is not a readable dataset at all.
    """
    n_rows = n_bad = 0
    try:
        for _, errors in _scan(Path(path), max_vts=max_vts, allow_outside=False):
            n_rows += 1
            if errors:
                n_bad += 1
                rest = "; ".join(f"{e.field}: {e.reason}" for e in errors[1:])
                print(f"{errors[0]}" + (f"; {rest}" if rest else ""))
    except (ValueError, OSError) as e:  # not a readable dataset at all (DataError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {n_rows} rows, {n_rows - n_bad} valid, {n_bad} invalid")
    return 1 if n_bad else 0


def write_dataset(
    samples: Iterable[Sample], out_dir: str | os.PathLike, *, overwrite: bool = False, progress: bool = False
) -> Path:
    """Write `samples` as a native dataset folder, atomically; returns the folder.

    Everything is written into a temporary folder next to `out_dir` and renamed into place at the
    end, so a crash leaves no half-written dataset. An existing non-empty `out_dir` is replaced
    only if it is a dataset (has `data.jsonl`) and `overwrite` is set. Images are stored as RGB PNG.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            if not (out_dir / NATIVE_FILE).is_file():
                raise FileExistsError(f"{out_dir} is a non-empty folder that is not a dataset; not touching it")
            if not overwrite:
                raise FileExistsError(f"dataset {out_dir} exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / IMAGE_DIR).mkdir(parents=True)
    try:
        _write_rows(samples, tmp, progress)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def make_command(
    task: str, out: str | os.PathLike, n: int, seed: int, split: str = "train", **task_options: Any
) -> int:
    """`visual-opsd data make <task> --out DIR`: generate `n` samples and write them atomically."""
    from visual_opsd.tasks import get_task

    start = time.perf_counter()
    try:
        generator = get_task(task).generate
        _check_options(task, generator, task_options)
        samples = generator(n, seed, split, **task_options)
        write_dataset(samples, out, overwrite=True, progress=len(samples) >= 500)
    except (KeyError, ValueError, FileExistsError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    n_vts = sum(len(s.vt_images) for s in samples)
    options = " ".join(f"{k}={v}" for k, v in task_options.items())
    print(
        f"wrote {len(samples)} {task} samples (split {split}, seed {seed}{', ' + options if options else ''}) "
        f"with {n_vts} visual thoughts to {out} in {time.perf_counter() - start:.1f}s"
    )
    return 0


def _check_options(task: str, generate: Any, options: dict[str, Any]) -> None:
    """Unknown task options fail with the list of known ones (not a TypeError traceback)."""
    params = inspect.signature(generate).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name in params if name not in ("n", "seed", "split")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task {task} has no option {', '.join(unknown)}; its options: {', '.join(known) or 'none'}")


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def strip_answer(text: str) -> str:
    """The bare answer inside `<answer>...</answer>` and/or `\\boxed{...}` (one or two backslashes).

    `<answer>\\boxed{D,R}</answer>` -> `D,R`; text with neither wrapper is returned stripped.
    """
    text = text.strip()
    match = re.fullmatch(r"<answer>(.*)</answer>", text, re.DOTALL)
    if match:
        text = match.group(1).strip()
    match = re.fullmatch(r"\\{1,2}boxed\{(.*)\}", text, re.DOTALL)
    if match and _balanced(match.group(1)):  # not "\boxed{a} or \boxed{b}"
        text = match.group(1).strip()
    return text


def thinkmorph_task_name(name: str | None) -> str:
    """Our task name for a ThinkMorph `task` value ("Spatial_Navigation" -> "maze"); else unchanged."""
    if not name:
        return ""
    return THINKMORPH_TASKS.get(name.strip().lower().replace("-", "_").replace(" ", "_"), name)


# ---------------------------------------------------------------------------------------------
# Scanning: every format yields (sample or None, errors) per row; checks common to all live here.


class _Row(NamedTuple):
    """One row as a format reader sees it, before the checks that need the whole dataset."""

    label: str  # how messages name the row: the sample id when readable, else "line N" / "row N"
    where: str  # its position in its file: "line N" / "row N"
    file: str
    sample_id: str | None  # when readable, even if the row is bad (for duplicate detection)
    sample: Sample | None  # None when the row has errors
    errors: list[RowError]


def _scan(path: Path, *, max_vts: int, allow_outside: bool) -> Iterator[tuple[Sample | None, list[RowError]]]:
    """(sample or None, its problems) for every row of the dataset at `path`."""
    fmt = dataset_format(path)
    if fmt == "native":
        jsonl = path if path.is_file() else path / NATIVE_FILE
        rows: Iterator[_Row] = _scan_native(jsonl, max_vts, allow_outside)
    elif fmt == "parquet":
        rows = (r for f in _parquet_files(path) for r in _scan_parquet(f, max_vts, allow_outside))
    elif fmt == "tsv":
        rows = _scan_tsv(path, max_vts, allow_outside)
    else:
        rows = _scan_vsp(path, max_vts, allow_outside)

    first_seen: dict[str, tuple[str, str]] = {}  # id -> (position, file) where it first appeared
    tasks: dict[str, Any] = {}
    for row in rows:
        errors = list(row.errors)
        if row.sample_id is not None:
            if row.sample_id in first_seen:
                where, file = first_seen[row.sample_id]
                first = where if file == row.file else f"{where} of {file}"
                errors.append(RowError(row.label, "id", f"duplicate id (first at {first})", row.file))
            else:
                first_seen[row.sample_id] = (row.where, row.file)
        if row.sample is not None and not errors:
            errors = _check_task(row.label, row.sample, tasks, row.file)
        yield (None if errors else row.sample), errors


def _check_content(
    label: str, file: str, question: str | None, answer: str | None, n_vts: int, n_thoughts: int, max_vts: int
) -> list[RowError]:
    """Checks shared by every format (`None` text means its type was wrong, already reported)."""
    errors = []
    if question is not None and not question.strip():
        errors.append(RowError(label, "question", "empty", file))
    if answer is not None and not answer.strip():
        errors.append(RowError(label, "answer", "empty", file))
    for name, text in (("question", question), ("answer", answer)):
        bad = None if text is None else _CONTROL.search(text)
        if bad:
            errors.append(RowError(label, name, f"control character {bad.group()!r} at position {bad.start()}", file))
    if n_vts > max_vts:
        errors.append(RowError(label, "vt_images", f"{n_vts} visual thoughts, more than max_vts={max_vts}", file))
    if n_thoughts and n_thoughts != n_vts + 1:
        errors.append(RowError(label, "thoughts", f"{n_thoughts} thoughts for {n_vts} VTs (need {n_vts + 1})", file))
    return errors


def _check_task(label: str, sample: Sample, cache: dict[str, Any], file: str | None) -> list[RowError]:
    """The task's own checks (e.g. a maze must be solvable); a sample without a task, or of a task no
    one registered, has none (training on it works; what scores it, eval or validation, refuses it
    with `unscorable`)."""
    from visual_opsd.tasks import TASKS, get_task

    if sample.task not in TASKS:
        return []
    task = cache.setdefault(sample.task, get_task(sample.task))
    try:
        problems = task.validate(sample)
    except Exception as e:  # a validator crashing on odd input is itself a finding about the row
        return [RowError(label, "task", f"{sample.task} validation failed: {e!r}", file)]
    return [RowError(label, f, reason, file) for f, reason in problems]


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _type_ok(value: Any, spec: str) -> bool:
    for option in spec.split("|"):
        if option == "null" and value is None:
            return True
        if option == "str" and isinstance(value, str):
            return True
        if option == "object" and isinstance(value, dict):
            return True
        if option == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Native JSONL


def _scan_native(jsonl: Path, max_vts: int, allow_outside: bool) -> Iterator[_Row]:
    with jsonl.open("rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not a crash
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # skip the rest of the over-long line without holding it
                where = f"line {lineno}"
                reason = f"line longer than {MAX_LINE_BYTES:,} bytes"
                yield _Row(where, where, str(jsonl), None, None, [RowError(where, "json", reason, str(jsonl))])
            elif raw.strip():
                yield _parse_native(raw, f"line {lineno}", jsonl.parent, str(jsonl), max_vts, allow_outside)


def _parse_native(raw: bytes, where: str, base: Path, file: str, max_vts: int, allow_outside: bool) -> _Row:
    def bad(field: str, reason: str) -> _Row:
        return _Row(where, where, file, None, None, [RowError(where, field, reason, file)])

    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return bad("json", f"not UTF-8 ({e.reason})")
    except json.JSONDecodeError as e:
        return bad("json", f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return bad("row", f"expected a JSON object, got {_json_type(obj)}")

    rid = obj.get("id")
    sample_id = rid if isinstance(rid, str) and rid.strip() else None
    label = sample_id or where
    errors: list[RowError] = []
    for name, (spec, required) in FIELDS.items():
        if name not in obj:
            if required:
                errors.append(RowError(label, name, "missing required field", file))
        elif not _type_ok(obj[name], spec):
            errors.append(RowError(label, name, f"expected {spec}, got {_json_type(obj[name])}", file))
    if isinstance(rid, str) and not rid.strip():
        errors.append(RowError(label, "id", "empty", file))
    for name in sorted(obj.keys() - FIELDS.keys()):
        shown = name if name.isprintable() and name.strip() else repr(name)  # "" or "\x00" must still show
        errors.append(RowError(label, shown, "unknown field (put extra data under metadata)", file))

    def typed(name: str, spec: str, default: Any) -> Any:
        value = obj.get(name, default)
        return value if _type_ok(value, spec) else default

    paths = {key: typed(key, "list[str]", []) for key in ("problem_images", "vt_images")}
    thoughts = typed("thoughts", "list[str]", [])
    question, answer = typed("question", "str", None), typed("answer", "str", None)
    errors += _check_content(label, file, question, answer, len(paths["vt_images"]), len(thoughts), max_vts)
    images: dict[str, list[Image.Image]] = {key: [] for key in paths}
    for key, rels in paths.items():
        for k, rel in enumerate(rels):
            field_name = f"{key}[{k}]"
            problem = image_path_problem(rel, allow_outside)
            if problem is None and not (base / rel).is_file():
                problem = f"image file not found: {rel}"
            if problem is None and not allow_outside and not (base / rel).resolve().is_relative_to(inside_root(base)):
                problem = f"path {rel!r} leaves the dataset folder through a symbolic link"
            if problem is None:
                try:
                    images[key].append(decode_image(base / rel))
                except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
                    problem = f"cannot decode image {rel}: {e}"
            if problem:
                errors.append(RowError(label, field_name, problem, file))
    if errors:
        return _Row(label, where, file, sample_id, None, errors)
    sample = Sample(
        id=obj["id"],
        task=obj.get("task", ""),
        question=obj["question"],
        answer=obj["answer"],
        problem_images=images["problem_images"],
        vt_images=images["vt_images"],
        thoughts=list(thoughts),
        text_only_trace=obj.get("text_only_trace"),
        choices=obj.get("choices"),
        metadata=obj.get("metadata", {}),
    )
    return _Row(label, where, file, sample_id, sample, [])


def _safe_stem(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("._")[:96] or "sample"


def _write_rows(samples: Iterable[Sample], folder: Path, progress: bool) -> None:
    from tqdm import tqdm

    stems: set[str] = set()
    ids: set[str] = set()
    with (folder / NATIVE_FILE).open("w", encoding="utf-8") as f:
        for index, s in enumerate(tqdm(samples, desc="writing", unit="sample", disable=not progress)):
            where = f"sample {index}"
            if not isinstance(s.id, str) or not s.id.strip():
                raise DataError(f"id must be a non-empty string, got {s.id!r}", row=where, field="id")
            if s.id in ids:
                raise DataError("duplicate id", row=s.id, field="id")
            ids.add(s.id)
            # File names from ids: sanitised, and made unique (ids "a/b" and "a_b" would collide;
            # lower-cased so case-insensitive file systems don't merge "A" and "a").
            stem = _safe_stem(s.id)
            if stem.lower() in stems:
                stem = f"{stem}-{index}"
            stems.add(stem.lower())
            row: dict[str, Any] = {"id": s.id, "task": s.task, "question": s.question, "answer": s.answer}
            for key, kind, images in (
                ("problem_images", "problem", s.problem_images),
                ("vt_images", "vt", s.vt_images),
            ):
                row[key] = []
                for k, img in enumerate(images):
                    rel = f"{IMAGE_DIR}/{stem}_{kind}_{k}.png"
                    img.convert("RGB").save(folder / rel, format="PNG")
                    row[key].append(rel)
            row.update(
                thoughts=list(s.thoughts),
                text_only_trace=s.text_only_trace,
                choices=None if s.choices is None else list(s.choices),
                metadata=s.metadata,
            )
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as e:
                raise DataError(f"not JSON-serialisable ({e})", row=s.id, field="metadata") from e
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`; an old dataset there is moved aside, then deleted."""
    if out_dir.exists() and any(out_dir.iterdir()):
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)  # POSIX rename replaces an empty folder


# ---------------------------------------------------------------------------------------------
# ThinkMorph parquet


def _parquet_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(path.rglob("*.parquet"))


def _indexed(names: Iterable[str], pattern: re.Pattern) -> list[str]:
    """Column names matching `pattern`, ordered by their number (so 10 comes after 9)."""
    found = [(int(m.group(1)), name) for name in names if (m := pattern.match(name))]
    return [name for _, name in sorted(found)]


def _scan_parquet(file: Path, max_vts: int, allow_outside: bool) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:
        raise DataError(f"cannot read parquet file ({e})", file=file) from e
    names = pf.schema_arrow.names
    missing = [c for c in ("question", "answer") if c not in names]
    if missing:
        raise DataError(f"missing required column(s) {', '.join(missing)}", file=file)
    groups = {
        "problem": _indexed(names, _PROBLEM_IMAGE),
        "vt": _indexed(names, _REASONING_IMAGE),
        "thought": _indexed(names, _THOUGHT),
    }
    columns = [c for c in names if c in _PARQUET_SCALARS] + [c for cols in groups.values() for c in cols]
    index = 0
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
    while True:
        try:  # corrupt pages surface only when read: a located error, not an arrow traceback
            batch = next(batches, None)
            records = [] if batch is None else batch.to_pylist()
        except Exception as e:
            raise DataError(f"cannot read rows {index}.. ({type(e).__name__}: {e})", file=file) from e
        if batch is None:
            break
        for record in records:
            yield _parse_parquet_row(record, index, file, groups, "pid" in names, max_vts, allow_outside)
            index += 1


def _parse_parquet_row(
    rec: dict[str, Any],
    index: int,
    file: Path,
    groups: dict[str, list[str]],
    has_pid: bool,
    max_vts: int,
    allow_outside: bool,
) -> _Row:
    where, fname = f"row {index}", str(file)
    label, errors = where, []
    sample_id: str | None = None
    if not has_pid:
        sample_id = f"{file.stem}-{index}"  # no pid column: the id says where the row came from
    else:
        pid = rec.get("pid")
        if isinstance(pid, (str, int)) and not isinstance(pid, bool) and str(pid).strip():
            sample_id = label = str(pid)
        elif pid is None:
            errors.append(RowError(label, "pid", "missing required field", fname))
        else:
            errors.append(RowError(label, "pid", f"expected a non-empty string or int, got {pid!r}", fname))

    def text(column: str, required: bool) -> str | None:
        value = rec.get(column)
        if value is None and required:
            errors.append(RowError(label, column, "missing required field", fname))
        elif value is not None and not isinstance(value, str):
            errors.append(RowError(label, column, f"expected str, got {type(value).__name__}", fname))
            return None
        return value

    def in_order(columns: list[str]) -> list[tuple[str, Any]]:
        """Non-null cells of numbered columns, in order; a gap before a later cell is an error."""
        present = [(c, rec.get(c)) for c in columns]
        filled = [i for i, (_, v) in enumerate(present) if v is not None]
        if not filled:
            return []
        last = filled[-1]
        for c, v in present[:last]:
            if v is None:
                errors.append(RowError(label, c, f"missing while a later {columns[last]} is present", fname))
        return [(c, v) for c, v in present if v is not None]

    question, answer = text("question", True), text("answer", True)
    task, trace = text("task", False), text("full_text_only_thought", False)
    answer = None if answer is None else strip_answer(answer)
    thoughts = []
    for column, value in in_order(groups["thought"]):
        if isinstance(value, str):
            thoughts.append(value)
        else:
            errors.append(RowError(label, column, f"expected str, got {type(value).__name__}", fname))
    vt_cells = in_order(groups["vt"])
    errors += _check_content(label, fname, question, answer, len(vt_cells), len(thoughts), max_vts)
    images: dict[str, list[Image.Image]] = {"problem": [], "vt": []}
    for kind, cells in (("problem", in_order(groups["problem"])), ("vt", vt_cells)):
        for column, value in cells:
            try:
                images[kind].append(_decode_parquet_image(value, file.parent, allow_outside))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
                errors.append(RowError(label, column, f"cannot decode image: {e}", fname))
    ours = thinkmorph_task_name(task)
    choices = None
    if ours == "multiple_choice" and question is not None and answer is not None:
        choices, answer = _choices_from_question(question, answer, label, fname, task, errors)
    if errors or question is None or answer is None or sample_id is None:
        return _Row(label, where, fname, sample_id, None, errors)
    sample = Sample(
        id=sample_id,
        task=ours,
        question=question,
        answer=answer,
        choices=choices,
        problem_images=images["problem"],
        vt_images=images["vt"],
        thoughts=thoughts,
        text_only_trace=trace,
        metadata={"source_file": file.name, "source_row": index},
    )
    return _Row(label, where, fname, sample_id, sample, [])


def _choices_from_question(
    question: str, answer: str, label: str, fname: str, task: str | None, errors: list[RowError]
) -> tuple[list[str] | None, str]:
    """A ThinkMorph multiple-choice row's options (read from its question) and its answer as a letter;
    problems are appended to `errors`."""
    from visual_opsd.tasks.choice import answer_letter, options_in_question

    choices = options_in_question(question)
    if choices is None:
        errors.append(RowError(label, "question", f"task {task} is multiple choice, but the question lists no "
                                                  "options as (A) ... (B) ...", fname))
        return None, answer
    found = answer_letter(answer, choices)
    if found is None:
        errors.append(RowError(label, "answer", f"{answer!r} is neither an option letter nor an option's text "
                                                f"(options: {', '.join(choices)})", fname))
        return choices, answer
    return choices, found


def _decode_parquet_image(value: Any, base: Path, allow_outside: bool) -> Image.Image:
    """An HF Image cell: a `{"bytes", "path"}` struct (bytes preferred), raw bytes, or a path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise ValueError(f"unexpected image cell of type {type(value).__name__}")
    if data:
        return decode_image(bytes(data))
    if path:
        return decode_image(checked_image_path(base, path, allow_outside))
    raise ValueError("image cell holds neither bytes nor a path")


# ---------------------------------------------------------------------------------------------
# VSP folders (parsing lives in visual_opsd.vsp; here only the shared checks apply)


def _scan_vsp(path: Path, max_vts: int, allow_outside: bool) -> Iterator[_Row]:
    from visual_opsd.vsp import iter_vsp_items

    for i, item in enumerate(iter_vsp_items(path, allow_outside=allow_outside)):
        label, file = f"vsp-L{item.level}-{item.index}", str(item.file)
        if item.sample is None:  # a bad map, table or image: one located, skippable row
            yield _Row(label, f"item {i}", file, None, None, [RowError(label, item.field, str(item.error), file)])
            continue
        sample = item.sample
        errors = _check_content(
            sample.id, file, sample.question, sample.answer, len(sample.vt_images), len(sample.thoughts), max_vts
        )
        yield _Row(sample.id, f"item {i}", file, sample.id, None if errors else sample, errors)


# ---------------------------------------------------------------------------------------------
# VLMEvalKit TSV files (parsing lives in visual_opsd.vlmeval; here only the shared checks apply)


def _scan_tsv(path: Path, max_vts: int, allow_outside: bool) -> Iterator[_Row]:
    from visual_opsd.vlmeval import scan_tsv

    file = str(path)
    for row in scan_tsv(path, allow_outside=allow_outside):
        label = row.index if row.index is not None else row.position
        errors = [RowError(label, column, reason, file) for column, reason in row.problems]
        sample = row.sample
        if sample is not None:
            errors += _check_content(label, file, sample.question, sample.answer, 0, 0, max_vts)
        yield _Row(label, row.position, file, row.index, None if errors else sample, errors)
