"""Task registry: ``TASKS = {name: class}`` (see :mod:`diffq_bench.tasks.base`)."""
import typing as tp

from .base import Task
from .lm import WikiText103Task, WikiTextMiniTask
from .separation import MusdbDemucsTask, SfmixTask
from .vision import VISION_TASKS

TASKS: tp.Dict[str, tp.Type[Task]] = {
    WikiText103Task.name: WikiText103Task,
    WikiTextMiniTask.name: WikiTextMiniTask,
    MusdbDemucsTask.name: MusdbDemucsTask,
    SfmixTask.name: SfmixTask,
    **VISION_TASKS,
}


def get_task(name: str, **kwargs: tp.Any) -> Task:
    """Build the task registered as ``name``; unknown names list the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "get_task", "Task"]
