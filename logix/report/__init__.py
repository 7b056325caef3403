"""Reports people look at: an HTML attribution report and its figures.

``logix report DIR`` (or :func:`write_report`) writes ``DIR/report.html``, one self-contained file
(figures embedded, CSS and JS inline, nothing fetched). The same figures come from Python as
matplotlib figures::

    from logix import report
    report.plot_score_distribution("logix_runs/quickstart")
    report.plot_self_influence("logix_runs/quickstart")
    report.plot_contribution_scores("logix_runs/contribution")
"""

from logix.analysis.records import per_module_records
from logix.report.data import (
    ContributionData,
    InfluenceData,
    ReportData,
    ReportError,
    ReportKind,
    load,
)
from logix.report.html import render, write_report
from logix.report.plots import (
    figure_png_base64,
    per_module_shares,
    plot_agreement,
    plot_categories,
    plot_contribution_scores,
    plot_lengths,
    plot_per_module,
    plot_score_distribution,
    plot_self_influence,
    self_influence_outliers,
)

__all__ = [
    "ContributionData",
    "InfluenceData",
    "ReportData",
    "ReportError",
    "ReportKind",
    "figure_png_base64",
    "load",
    "per_module_records",
    "per_module_shares",
    "plot_agreement",
    "plot_categories",
    "plot_contribution_scores",
    "plot_lengths",
    "plot_per_module",
    "plot_score_distribution",
    "plot_self_influence",
    "render",
    "self_influence_outliers",
    "write_report",
]
