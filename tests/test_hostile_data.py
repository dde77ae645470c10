"""Hostile data: property-based tests (hypothesis) over native JSONL rows, ThinkMorph parquet rows
and VSP folders. Wrong types, missing fields, huge / zero-size / corrupt images, non-UTF-8 bytes,
absurd grid sizes, control characters. The properties:

- loading either succeeds or raises `DataError` naming the file (and row and field for a bad row);
- with `skip_invalid=True` every row is either a sample or a counted skip with a located reason;
- every sample that loads is well formed (non-empty text, RGB images within the pixel limit);
- no other exception, no hang (a per-example deadline), bounded memory (images are size-checked
  from their header before decoding).

Runs are bounded (`max_examples`, `deadline`) to keep the suite in seconds. Each test runs its
property (hypothesis) and then checks that the fuzzing reached both sides: ROWS counts the rows (maps)
tried, LOADED those that loaded as valid samples, and some of each must have been generated.
"""

from __future__ import annotations

import io
import json
import re
import resource
import struct
import tempfile
import zlib
from pathlib import Path

import pyarrow as pa  # a core dependency: the parquet properties always run
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visual_opsd.data import NATIVE_FILE, load_dataset, validate_rows
from visual_opsd.errors import DataError
from visual_opsd.images import MAX_IMAGE_PIXELS

ROWS = {"jsonl": 0, "parquet": 0, "vsp": 0}  # rows (maps) tried
LOADED = {"jsonl": 0, "parquet": 0, "vsp": 0}  # of which loaded as valid samples
SETTINGS = settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data (a decompression bomb
    shape when large; never decodable in full)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)

    def chunk(body: bytes) -> bytes:
        return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))

    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(idat) + chunk(b"IEND")


def valid_png(w: int = 6, h: int = 5) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {
    "valid.png": valid_png(),
    "empty.png": b"",
    "garbage.png": b"GIF89a\x00\xff" * 7,
    "truncated.png": valid_png(40, 40)[:60],
    "huge.png": png_with_header(100_000, 100_000),
    "over_limit.png": png_with_header(7000, 7000),
    "zero.png": png_with_header(0, 5),
    "text.png": "not an image ✓".encode(),
}
IMAGE_REFS = [f"images/{name}" for name in IMAGES] + ["images/missing.png", "../outside.png", "/etc/hostname", ""]

hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=30)  # includes control characters
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)


def either(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a value of the right type, sometimes anything at all."""
    return st.one_of(good, good, json_values)


image_lists = st.lists(st.sampled_from(IMAGE_REFS), max_size=3)
rows = st.fixed_dictionaries(
    {},
    optional={
        "id": either(hostile_text),
        "task": either(st.sampled_from(["", "maze", "jigsaw", "no-such-task"])),
        "question": either(hostile_text),
        "answer": either(st.sampled_from(["R,D", "B", "", " ", "R\x00D", "\x1b[31mB"]) | hostile_text),
        "problem_images": either(image_lists),
        "vt_images": either(image_lists),
        "thoughts": either(st.lists(hostile_text, max_size=4)),
        "text_only_trace": either(st.none() | hostile_text),
        "choices": either(st.none() | st.lists(hostile_text, max_size=4)),
        "metadata": either(st.dictionaries(hostile_text, json_values, max_size=2)),
        "surprise": json_values,
    },
)
safe_text = st.text(alphabet="abcdefgh ?0123456789", min_size=1, max_size=12).filter(str.strip)
# Valid rows with at most one hostile change, so that the "what loads is well formed" property and
# the skip counting see a mix of good and bad rows.
near_valid_rows = st.builds(
    lambda row, key, value, drop: {
        k: v for k, v in {**row, **({key: value} if value is not None else {})}.items() if k != drop
    },
    st.fixed_dictionaries(
        {
            "id": safe_text,
            "question": safe_text,
            "answer": st.sampled_from(["B", "A", "yes"]),
            "problem_images": st.lists(st.sampled_from(["images/valid.png"] * 6 + IMAGE_REFS), max_size=2),
        }
    ),
    st.sampled_from(["id", "question", "answer", "problem_images", "vt_images", "thoughts", "metadata"]),
    st.none() | st.none() | json_values,
    st.none() | st.none() | st.sampled_from(["id", "question", "answer"]),
)
lines = st.one_of(
    near_valid_rows.map(lambda r: json.dumps(r).encode()),
    near_valid_rows.map(lambda r: json.dumps(r).encode()),
    rows.map(lambda r: json.dumps(r).encode()),
    rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),  # non-UTF-8, truncated JSON, stray bytes
)


def check(path: Path, n_rows: int | None, kind: str) -> None:
    """The properties of the module docstring for the dataset at `path` with `n_rows` rows."""
    try:
        strict = load_dataset(path)
    except DataError as e:
        assert e.file, f"DataError without a file: {e}"
        strict = None
    try:
        loaded = load_dataset(path, skip_invalid=True)
    except DataError as e:  # the file as a whole is unreadable (no rows to skip): located by file
        assert e.file and strict is None
        return
    if n_rows is not None:
        assert len(loaded) + loaded.n_skipped == n_rows
    if strict is not None:
        assert loaded.n_skipped == 0 and len(strict) == len(loaded)
    for err in loaded.errors:
        assert err.row_id and err.field and err.reason and err.file, err
    LOADED[kind] += len(loaded)
    for sample in loaded:
        assert isinstance(sample.question, str) and sample.question.strip()
        assert isinstance(sample.answer, str) and sample.answer.strip()
        for img in [*sample.problem_images, *sample.vt_images]:
            assert img.mode == "RGB" and 0 < img.width * img.height <= MAX_IMAGE_PIXELS
    # `data validate` runs the loader's checks: the same problems, row by row, as the skipped rows'
    assert problems(validate_rows(path)) == problems(loaded.errors)


def problems(errors: list) -> list[tuple]:
    """RowErrors as comparable tuples (a reason may name an in-memory file by its object address)."""
    return [(e.row_id, e.field, e.file, re.sub(r" at 0x[0-9a-f]+", "", e.reason)) for e in errors]


def fuzz(prop, kind: str) -> tuple[int, int]:
    """Run the hypothesis property `prop` (its examples fail the test on a broken property); the rows
    (maps) of `kind` it tried and how many of them loaded as valid samples."""
    ROWS[kind] = LOADED[kind] = 0
    prop()
    return ROWS[kind], LOADED[kind]


def write_images(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, data in IMAGES.items():
        (folder / "images" / name).write_bytes(data)


@SETTINGS
@given(st.lists(lines, min_size=1, max_size=6))
def jsonl_rows(raw_lines):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        write_images(folder)
        data = b"\n".join(raw_lines) + b"\n"
        (folder / NATIVE_FILE).write_bytes(data)
        n_rows = sum(1 for line in data.split(b"\n") if line.strip())
        ROWS["jsonl"] += n_rows
        check(folder, n_rows, "jsonl")


def test_jsonl_rows():
    tried, valid = fuzz(jsonl_rows, "jsonl")
    assert 0 < valid < tried, (tried, valid)  # good rows and bad rows were generated and told apart


def test_huge_images_fail_from_their_header_without_decoding(tmp_path):
    folder = tmp_path / "ds"
    write_images(folder)
    rows = [
        {"id": f"r{k}", "question": "q?", "answer": "B", "problem_images": [f"images/{name}"]}
        for k, name in enumerate(["huge.png", "over_limit.png", "zero.png", "valid.png"])
    ]
    (folder / NATIVE_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = load_dataset(folder, skip_invalid=True)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert [s.id for s in loaded] == ["r3"] and loaded.n_skipped == 3
    reasons = {e.row_id: e.reason for e in loaded.errors}
    # PIL's own bomb guard answers first far above the limit; ours (checked before decoding) below it
    assert "10000000000 pixels" in reasons["r0"] and "decompression bomb" in reasons["r0"]
    assert "7000x7000 = 49,000,000 pixels is over the limit" in reasons["r1"]
    assert "images/zero.png" in reasons["r2"]
    assert grown_mb < 100, f"resident memory grew by {grown_mb:.0f} MB"


def test_overlong_jsonl_line_is_one_bad_row(tmp_path, monkeypatch):
    import visual_opsd.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    folder = tmp_path / "ds"
    folder.mkdir()
    good = json.dumps({"id": "ok", "question": "q?", "answer": "B"})
    (folder / NATIVE_FILE).write_text(
        json.dumps({"id": "big", "question": "x" * 5000, "answer": "B"}) + "\n" + good + "\n"
    )
    loaded = load_dataset(folder, skip_invalid=True)
    assert [s.id for s in loaded] == ["ok"]
    assert loaded.errors[0].row_id == "line 1" and "longer than 1,000 bytes" in loaded.errors[0].reason


def test_control_characters_in_answers_are_located():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / NATIVE_FILE).write_text(json.dumps({"id": "a", "question": "q?", "answer": "R\x07D"}) + "\n")
        with pytest.raises(DataError, match=r"row a: answer: control character '\\x07' at position 1"):
            load_dataset(folder)


# --- parquet ----------------------------------------------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PARQUET_TYPES = {
    "pid": [pa.string(), pa.int64(), pa.float64(), pa.binary()],
    "question": [pa.string(), pa.string(), pa.int64()],
    "answer": [pa.string(), pa.string(), pa.binary()],
    "task": [pa.string()],
    "full_text_only_thought": [pa.string(), pa.int64()],
    "problem_image_0": [IMAGE_STRUCT, pa.binary(), pa.string(), pa.int64()],
    "reasoning_image_0": [IMAGE_STRUCT, pa.binary()],
    "resoning_thought_0": [pa.string(), pa.int64()],
    "resoning_thought_1": [pa.string()],
}


def parquet_value(tp):
    image_bytes = st.sampled_from(list(IMAGES.values())) | st.binary(max_size=30)
    if tp == IMAGE_STRUCT:
        return st.none() | st.fixed_dictionaries(
            {"bytes": st.none() | image_bytes, "path": st.none() | st.sampled_from(IMAGE_REFS)}
        )
    if tp == pa.binary():
        return st.none() | image_bytes
    if tp == pa.int64():
        return st.none() | st.integers(-(2**63), 2**63 - 1)
    if tp == pa.float64():
        return st.none() | st.floats()
    return st.none() | hostile_text | st.sampled_from(["Spatial_Navigation", "R,D", "<answer>\\boxed{B}</answer>"])


@st.composite
def parquet_tables(draw):
    n = draw(st.integers(1, 4))
    arrays = {}
    if draw(st.booleans()):  # plausible rows (unique pids, text, one valid image), then one hostile column
        arrays = {
            "pid": pa.array([f"p{k}" for k in range(n)]),
            "question": pa.array(draw(st.lists(safe_text, min_size=n, max_size=n))),
            "answer": pa.array(["<answer>\\boxed{B}</answer>"] * n),
            "problem_image_0": pa.array([{"bytes": IMAGES["valid.png"], "path": None}] * n, type=IMAGE_STRUCT),
        }
        columns = draw(st.lists(st.sampled_from(sorted(PARQUET_TYPES)), unique=True, max_size=1))
    else:
        columns = draw(st.lists(st.sampled_from(sorted(PARQUET_TYPES)), unique=True, min_size=1))
    for name in columns:
        tp = draw(st.sampled_from(PARQUET_TYPES[name]))
        arrays[name] = pa.array(draw(st.lists(parquet_value(tp), min_size=n, max_size=n)), type=tp)
    return pa.table(arrays), draw(st.none() | st.tuples(st.integers(0, 10_000), st.integers(0, 255)))


@SETTINGS
@given(parquet_tables())
def parquet_rows(table_and_damage):
    table, damage = table_and_damage
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        write_images(folder)
        file = folder / "train.parquet"
        pq.write_table(table, file)
        if damage is not None:  # flip one byte (or cut the file there): corrupt pages and footers
            data = bytearray(file.read_bytes())
            offset, value = damage
            if offset < len(data):
                data[offset] = value
            else:
                data = data[: len(data) // 2]
            file.write_bytes(bytes(data))
        ROWS["parquet"] += table.num_rows
        check(file, None if damage is not None else table.num_rows, "parquet")


def test_parquet_rows():
    tried, valid = fuzz(parquet_rows, "parquet")
    assert 0 < valid < tried, (tried, valid)


# --- VSP folders ------------------------------------------------------------------------------


def table_text(grid: list[str]) -> str:
    width = len(grid[0]) if grid else 0
    head = "| | " + " | ".join(f"Col {c + 1}" for c in range(width)) + " |"
    body = [f"| Row {r + 1} | " + " | ".join(row) + " |" for r, row in enumerate(grid)]
    return "\n".join([head, *body]) + "\n"


@st.composite
def vsp_maps(draw):
    level = draw(st.integers(3, 8) | st.integers(3, 8) | st.sampled_from([0, 1, 2, 33, 10**6]))
    size = draw(st.sampled_from([level, level, level, 3, 200]) if level <= 40 else st.just(3))
    cells = st.sampled_from("@*#_")
    if draw(st.booleans()):  # a plausible map (start top-left, goal bottom-right), so some maps load
        grid = ["@" + "_" * (size - 1)] + ["_" * size] * (size - 2) + ["_" * (size - 1) + "*"] if size >= 2 else ["@"]
    else:
        grid = draw(st.lists(st.text(cells, min_size=size, max_size=size), min_size=size, max_size=size))
    kind = draw(st.sampled_from(["table", "table", "table", "text", "bytes"]))
    if kind == "table":
        table = table_text(grid).encode()
    elif kind == "text":
        table = draw(hostile_text).encode()
    else:
        table = draw(st.binary(max_size=50))
    image = draw(st.sampled_from(["valid.png"] * 6 + list(IMAGES)) | st.none())
    return level, draw(st.integers(0, 20)), table, image


@settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.lists(vsp_maps(), min_size=1, max_size=4))
def vsp_folders(maps):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "vsp"
        for level, index, table, image in maps:
            (root / f"level{level}" / "table").mkdir(parents=True, exist_ok=True)
            (root / f"level{level}" / "img").mkdir(parents=True, exist_ok=True)
            (root / f"level{level}" / "table" / f"{index}.txt").write_bytes(table)
            if image is not None:
                (root / f"level{level}" / "img" / f"{index}.png").write_bytes(IMAGES[image])
        ROWS["vsp"] += len(maps)
        check(root, None, "vsp")


def test_vsp_folders():
    tried, valid = fuzz(vsp_folders, "vsp")
    assert 0 < valid < tried, (tried, valid)  # maps that load and maps that fail
