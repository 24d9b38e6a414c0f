"""The dense-labeling benchmark: tasks, training loops, protocol and summaries.

Imports matplotlib only when plotting and scikit-learn only for the digits task.
"""

from .protocol import PROFILES, Profile, criterion_analysis, run_benchmark, run_one
from .summary import aggregate, markdown, merge_results, plot_accuracy_vs_macs, write_summary
from .tasks import TASKS, Task, get_task
from .training import make_loader, train

__all__ = [
    "PROFILES",
    "Profile",
    "TASKS",
    "Task",
    "aggregate",
    "criterion_analysis",
    "get_task",
    "make_loader",
    "markdown",
    "merge_results",
    "plot_accuracy_vs_macs",
    "run_benchmark",
    "run_one",
    "train",
    "write_summary",
]
