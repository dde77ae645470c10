"""Tasks: generators, prompts, answer extraction and scoring. Importing this registers them all."""

from visual_opsd.tasks import benchmark, jigsaw, maze  # noqa: F401  (importing a task module registers it)
from visual_opsd.tasks.base import TASKS, Task, get_task, register

__all__ = ["TASKS", "Task", "get_task", "register"]
