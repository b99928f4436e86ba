"""The study as one command: the grid runner, synthetic tiny data, and the report.

Public API (see each module):

- :class:`StudySpec`, :class:`RunPlan`, :func:`plan_study`, :func:`run_study`,
  :func:`command_lines` (runner)
- :func:`write_report`, :func:`speedup`, :func:`tokens_to_reach` (report)
- :func:`write_mixture`, :func:`write_tasks` (synthetic)

``megarch-study`` (:mod:`megarch.study.cli`) fronts them.
"""

from megarch.study.report import speedup, tokens_to_reach, write_report
from megarch.study.runner import RunPlan, StudySpec, command_lines, plan_study, run_study
from megarch.study.synthetic import write_mixture, write_tasks

__all__ = [
    "RunPlan",
    "StudySpec",
    "command_lines",
    "plan_study",
    "run_study",
    "speedup",
    "tokens_to_reach",
    "write_mixture",
    "write_report",
    "write_tasks",
]
