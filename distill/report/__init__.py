"""Reports over run directories: `write_report(run_dirs, out)` writes one self-contained HTML page."""

from distill.report.html import write_report

__all__ = ["write_report"]
