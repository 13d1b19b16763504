"""Declarative automation shared by the pipeline's assets.

``eager()`` requests a partition when an upstream partition it depends on updates (or when it is missing and
its parents exist); ``code_version_changed()`` when the asset's code_version is bumped; never while a run of it
is in progress, and never on top of an upstream partition whose blocking checks failed."""

import dagster as dg

PIPELINE = (
    (dg.AutomationCondition.eager() | dg.AutomationCondition.code_version_changed())
    & dg.AutomationCondition.all_deps_blocking_checks_passed()
    & ~dg.AutomationCondition.in_progress()
).with_label("eager or code changed, upstream checks passed")
