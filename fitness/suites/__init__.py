"""Task suites: fitness plug-ins scored over a family of small tasks, with a meta-train part for
selection and a disjoint meta-test part for validation (``pref-suite``, ``cls-suite``)."""
from fitness.suites.base import SPLITS, Task, TaskResult, TaskSuite, aggregate

__all__ = ["SPLITS", "Task", "TaskResult", "TaskSuite", "aggregate"]
