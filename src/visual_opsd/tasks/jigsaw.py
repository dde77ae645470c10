"""Jigsaw: put the shuffled pieces of a picture back in order (multiple choice).

A picture (a colour gradient with a few circles, rectangles and stripes, drawn from a seed) is cut
into 2 pieces (left/right or top/bottom) or 4 pieces (a 2 x 2 grid). The problem image shows the
pieces shuffled, side by side in one row with small white gaps; piece k is the k-th from the left.
The question asks which order of pieces, filling the grid row by row, restores the picture; the
options are orders such as "2 1" or "3 1 4 2" (one correct, the others other permutations).

The visual thought is the assembled picture: a model that can "see" the assembly can check that
edges continue across seams, which is what the text-only trace has to do in words (edge colours).
Texts are short templates over a small vocabulary, every word and punctuation mark separated by
spaces, so that a tiny word-level tokenizer covers them.

Splits are disjoint by construction: a candidate picture belongs to split train, val or test by a
hash of its pixels, and each split keeps only its own pictures (and no repeats), so no picture is
ever shared between splits, whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np
from PIL import Image

from visual_opsd.sample import Sample
from visual_opsd.tasks.base import Task, register
from visual_opsd.tasks.choice import LETTERS, extract_choice, format_choices, letter, letter_index

SPLITS = ("train", "val", "test")

# Named colours: pictures are painted from these so that the text-only trace can name edge colours.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 220),
    "pink": (245, 150, 190),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
GAP_COLOUR = (255, 255, 255)

# Layout name -> (rows, cols) of the grid the picture is cut into.
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
_SLOT_NAMES = {
    "1x2": ["left", "right"],
    "2x1": ["top", "bottom"],
    "2x2": ["top left", "top right", "bottom left", "bottom right"],
}
_LAYOUT_TEXT = {
    "1x2": "The picture was cut into a left piece and a right piece .",
    "2x1": "The picture was cut into a top piece and a bottom piece .",
    "2x2": "The picture was cut into 4 pieces in a 2 by 2 grid .",
}


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a hash of `parts` (Python's `hash` is salted per process; sha256 isn't)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def split_of_image(pixels: np.ndarray) -> str:
    """The one split a picture may appear in, from a hash of its pixels."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes() + repr(pixels.shape).encode()).digest()
    return SPLITS[int.from_bytes(digest[:8], "little") % len(SPLITS)]


def draw_picture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A `size` x `size` RGB uint8 picture: a two-colour gradient plus 2-4 shapes."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    c1, c2 = rng.choice(len(PALETTE), size=2, replace=False)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = (1 - ramp)[..., None] * _PALETTE_RGB[c1] + ramp[..., None] * _PALETTE_RGB[c2]
    for _ in range(int(rng.integers(2, 5))):
        colour = _PALETTE_RGB[rng.integers(len(PALETTE))]
        kind = rng.integers(3)
        if kind == 0:  # disc
            cx, cy = rng.uniform(0, 1, size=2)
            r = rng.uniform(0.12, 0.35)
            mask = (xs - cx) ** 2 + (ys - cy) ** 2 < r**2
        elif kind == 1:  # axis-aligned rectangle
            x0, x1 = np.sort(rng.uniform(0, 1, size=2))
            y0, y1 = np.sort(rng.uniform(0, 1, size=2))
            mask = (xs >= x0) & (xs <= max(x1, x0 + 0.15)) & (ys >= y0) & (ys <= max(y1, y0 + 0.15))
        else:  # slanted stripe, crosses seams and so gives strong continuity cues
            a = rng.uniform(0, np.pi)
            offset = rng.uniform(-0.5, 0.5)
            width = rng.uniform(0.05, 0.15)
            mask = np.abs(np.cos(a) * (xs - 0.5) + np.sin(a) * (ys - 0.5) - offset) < width
        img[mask] = colour
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def cut(picture: np.ndarray, layout: str) -> list[np.ndarray]:
    """The pieces of `picture` for `layout`, row by row."""
    rows, cols = LAYOUTS[layout]
    h, w = picture.shape[0] // rows, picture.shape[1] // cols
    return [picture[r * h : (r + 1) * h, c * w : (c + 1) * w] for r in range(rows) for c in range(cols)]


def assemble(pieces: Sequence[np.ndarray], layout: str) -> np.ndarray:
    """The picture whose grid slots, row by row, hold `pieces`."""
    rows, cols = LAYOUTS[layout]
    return np.concatenate(
        [np.concatenate(list(pieces[r * cols : (r + 1) * cols]), axis=1) for r in range(rows)], axis=0
    )


def gap_px(image_px: int) -> int:
    """Width of the white gap between pieces in the problem image."""
    return max(1, image_px // 16)


def lay_out_in_row(pieces: Sequence[np.ndarray], gap: int) -> np.ndarray:
    """Pieces side by side, left to right, separated by `gap` white columns."""
    h = pieces[0].shape[0]
    spacer = np.full((h, gap, 3), GAP_COLOUR, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append(spacer)
        parts.append(piece)
    return np.concatenate(parts, axis=1)


def split_row(row: np.ndarray, n_pieces: int, gap: int) -> list[np.ndarray]:
    """Inverse of `lay_out_in_row`: the pieces of a problem image, left to right."""
    w = (row.shape[1] - gap * (n_pieces - 1)) // n_pieces
    return [row[:, i * (w + gap) : i * (w + gap) + w] for i in range(n_pieces)]


def parse_order(option: str) -> list[int]:
    """An option text "3 1 4 2" (commas also accepted) as 1-based piece numbers."""
    return [int(tok) for tok in option.replace(",", " ").split()]


def _edge_colour(piece: np.ndarray, side: str) -> str:
    """The most common palette colour along one edge of a piece (one pixel wide)."""
    strip = {"left": piece[:, 0], "right": piece[:, -1], "top": piece[0], "bottom": piece[-1]}[side]
    dist = ((strip[:, None, :].astype(np.float32) - _PALETTE_RGB[None]) ** 2).sum(-1)
    counts = np.bincount(dist.argmin(1), minlength=len(PALETTE))
    return _PALETTE_NAMES[int(counts.argmax())]


def _text_only_trace(shown: Sequence[np.ndarray], order: Sequence[int], layout: str, answer: str) -> str:
    """Reasoning in words: which piece edges meet at each seam of the correct assembly."""
    rows, cols = LAYOUTS[layout]
    names = _SLOT_NAMES[layout]
    sentences = [f"Piece {order[0]} goes {names[0]} ."]
    for slot in range(1, rows * cols):
        r, c = divmod(slot, cols)
        if c > 0:  # match with the left neighbour
            prev, sides = order[slot - 1], ("right", "left")
        else:  # first slot of a row: match with the piece above
            prev, sides = order[slot - cols], ("bottom", "top")
        here = order[slot]
        a = _edge_colour(shown[prev - 1], sides[0])
        b = _edge_colour(shown[here - 1], sides[1])
        sentences.append(
            f"The {sides[0]} edge of piece {prev} is {a} and the {sides[1]} edge of piece {here} is {b} , "
            f"so piece {here} goes {names[slot]} ."
        )
    sentences.append(f"The order is {' '.join(map(str, order))} , so the answer is {answer} .")
    return " ".join(sentences)


def _parse_pieces(pieces: int | str | Sequence[int]) -> tuple[int, ...]:
    if isinstance(pieces, str):  # from the command line: "4" or "2,4"
        pieces = [int(p) for p in pieces.replace(",", " ").split()]
    elif isinstance(pieces, int):
        pieces = [pieces]
    out = tuple(int(p) for p in pieces)
    if not out or any(p not in (2, 4) for p in out):
        raise ValueError(f"pieces must be 2 and/or 4, got {pieces!r}")
    return out


@register
class JigsawTask(Task):
    """Multiple-choice jigsaw; answer = the letter of the order that restores the picture."""

    name = "jigsaw"

    def generate(
        self,
        n: int,
        seed: int,
        split: str = "train",
        *,
        image_px: int = 64,
        pieces: int | str | Sequence[int] = (2, 4),
        n_choices: int = 4,
    ) -> list[Sample]:
        """`n` samples. `image_px`: side of the (square, even) picture; `pieces`: 2, 4 or both
        (chosen per sample; 2 picks left/right or top/bottom at random); `n_choices`: options per
        question, capped by the number of orders (2 pieces have only 2)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        image_px, n_choices = int(image_px), int(n_choices)
        if image_px < 4 or image_px % 2:
            raise ValueError(f"image_px must be even and >= 4, got {image_px}")
        if not 2 <= n_choices <= len(LETTERS):
            raise ValueError(f"n_choices must be in 2..{len(LETTERS)}, got {n_choices}")
        piece_counts = _parse_pieces(pieces)
        gap = gap_px(image_px)

        samples: list[Sample] = []
        seen: set[bytes] = set()
        attempt = 0
        while len(samples) < n:
            # Candidates come from a stream keyed by (seed, split, attempt); only pictures whose pixel
            # hash says `split`, and not seen before, are kept (about 1 candidate in 3).
            rng = _rng("jigsaw", seed, split, attempt)
            attempt += 1
            picture = draw_picture(rng, image_px)
            key = hashlib.sha256(picture.tobytes()).digest()
            if split_of_image(picture) != split or key in seen:
                continue
            k = int(rng.choice(piece_counts))
            layout = "2x2" if k == 4 else ("1x2" if rng.integers(2) == 0 else "2x1")
            parts = cut(picture, layout)
            if any(np.array_equal(a, b) for a, b in itertools.combinations(parts, 2)):
                continue  # identical pieces would make several orders correct
            seen.add(key)

            shuffle = [int(i) for i in rng.permutation(k)]  # shown[j] = parts[shuffle[j]]
            shown = [parts[i] for i in shuffle]
            # order[slot] = the 1-based shown position of the piece that belongs in grid `slot`
            order = [shuffle.index(slot) + 1 for slot in range(k)]
            perms = [list(p) for p in itertools.permutations(range(1, k + 1)) if list(p) != order]
            m = min(n_choices, len(perms) + 1)
            distractors = [perms[i] for i in rng.choice(len(perms), size=m - 1, replace=False)]
            correct = int(rng.integers(m))
            options = distractors[:correct] + [order] + distractors[correct:]
            choices = [" ".join(map(str, o)) for o in options]
            answer = letter(correct)
            order_text = " ".join(map(str, order))

            question = (
                f"{_LAYOUT_TEXT[layout]} The pieces are shown shuffled from left to right as pieces 1 to {k} . "
                "Which order of pieces , filling the grid row by row , restores the picture ? "
                f"Options : {format_choices(choices)}"
            )
            samples.append(
                Sample(
                    id=f"jigsaw-{split}-s{seed}-{len(samples):05d}",
                    task=self.name,
                    question=question,
                    answer=answer,
                    problem_images=[Image.fromarray(lay_out_in_row(shown, gap))],
                    vt_images=[Image.fromarray(picture)],
                    thoughts=[
                        f"Let me try assembling the pieces in order {order_text} .",
                        f"The assembled picture is continuous , so the answer is {answer} .",
                    ],
                    text_only_trace=_text_only_trace(shown, order, layout, answer),
                    choices=choices,
                    metadata={
                        "split": split,
                        "layout": layout,
                        "pieces": k,
                        "order": order,
                        "image_px": image_px,
                        "gap_px": gap,
                    },
                )
            )
        return samples

    def extract_answer(self, text: str) -> str | None:
        """The option letter the text commits to (any of A..Z; see `choice.extract_choice`)."""
        return extract_choice(text)

    def is_correct(self, sample: Sample, prediction: str) -> bool:
        """Whether the model output picks the sample's correct letter (or repeats its order)."""
        return extract_choice(prediction, choices=sample.choices) == sample.answer

    def validate(self, sample: Sample) -> list[tuple[str, str]]:
        """Options must be distinct orders of the same pieces; the answer a letter among them."""
        problems: list[tuple[str, str]] = []
        choices = sample.choices
        if not choices or len(choices) < 2:
            return [("choices", "jigsaw is multiple choice: need at least 2 options")]
        if len(choices) > len(LETTERS):
            problems.append(("choices", f"at most {len(LETTERS)} options, got {len(choices)}"))
        orders = []
        for i, option in enumerate(choices[: len(LETTERS)]):
            try:
                o = parse_order(option)
            except ValueError:
                o = []
            if sorted(o) != list(range(1, len(o) + 1)) or len(o) < 2:
                problems.append(("choices", f"option {letter(i)} {option!r} is not an order of pieces 1..k"))
            orders.append(o)
        if len({len(o) for o in orders}) > 1:
            problems.append(("choices", "options order different numbers of pieces"))
        if len({tuple(o) for o in orders}) != len(orders):
            problems.append(("choices", "options are not distinct"))
        if len(sample.answer) != 1 or sample.answer not in LETTERS[: len(choices)]:
            last = letter(min(len(choices), len(LETTERS)) - 1)
            problems.append(("answer", f"{sample.answer!r} is not one of the option letters A..{last}"))
        elif "order" in sample.metadata and orders[letter_index(sample.answer)] != list(sample.metadata["order"]):
            problems.append(("answer", f"option {sample.answer} is not the order stored in metadata.order"))
        if len(sample.problem_images) != 1:
            got = len(sample.problem_images)
            problems.append(("problem_images", f"expected 1 image of shuffled pieces, got {got}"))
        return problems
