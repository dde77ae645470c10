"""What a task is: a generator of samples, a prompt, an answer extractor and a scorer.

"How to ask the model" (backends, contexts) is kept apart from "what to ask and how to score"
(tasks), as evaluation harnesses do. Every task registers itself in `TASKS` by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from visual_opsd.sample import Sample

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its `name` to the CLI and configs."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    """The task called `name`, with a clear error listing the known ones."""
    import visual_opsd.tasks  # noqa: F401  (imports every task module, filling TASKS)

    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


def scorer_of(sample: Sample, default: Task) -> Task:
    """The task that scores `sample`: its own (a dataset may mix tasks), or `default` for a sample
    without one. A task no one registered is a DataError naming the sample and the known tasks."""
    if not sample.task or sample.task == default.name:
        return default
    if sample.task not in TASKS:
        from visual_opsd.errors import DataError

        raise DataError(f"unknown task {sample.task!r}; known tasks: {', '.join(sorted(TASKS))}", row=sample.id,
                        field="task")
    return TASKS[sample.task]()


def accuracy_by_task(samples: list[Sample], predictions: list[str], default: Task) -> dict[str, float]:
    """Accuracy (fraction) over all samples under "" and, when they mix tasks, per task by name."""
    hits: dict[str, list[bool]] = {}
    for s, p in zip(samples, predictions, strict=True):
        task = scorer_of(s, default)
        hits.setdefault(task.name, []).append(bool(task.is_correct(s, p)))
    flat = [h for v in hits.values() for h in v]
    out = {"": sum(flat) / max(1, len(flat))}
    if len(hits) > 1:
        out.update({name: sum(v) / len(v) for name, v in sorted(hits.items())})
    return out


class Task(ABC):
    name: str = ""

    @abstractmethod
    def generate(self, n: int, seed: int, split: str = "train", **options) -> list[Sample]:
        """`n` samples; different splits never share a problem."""

    @abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The answer a model's output commits to, or None when it gives none."""

    @abstractmethod
    def is_correct(self, sample: Sample, prediction: str) -> bool:
        """Whether the model output `prediction` solves `sample`."""

    def validate(self, sample: Sample) -> list[tuple[str, str]]:
        """Task-specific problems with a sample as (field, reason) pairs; empty when fine."""
        return []
