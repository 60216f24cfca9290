"""Width analysis: which tensor dimensions of a model are coupled, and how each may be narrowed.

* :func:`analyze` / :func:`analyze_graph` return a :class:`Plan` of :class:`WidthGroup`s;
* :mod:`fxcompress.analysis.ops` holds one rule per op kind;
* the analysis is pure: it never modifies the graph it reads.
"""

from fxcompress.analysis.plan import Plan, Use, WidthGroup
from fxcompress.analysis.propagate import analyze, analyze_graph

__all__ = ["Plan", "Use", "WidthGroup", "analyze", "analyze_graph"]
