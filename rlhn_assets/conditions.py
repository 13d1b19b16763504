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

# all_deps_match() wants a matching partition in every dep, so it is never true for a partition that some dep maps
# to no partition at all (eval_model[base] has no trained_* parent, eval_model[<variant>] no base_retriever
# parent). For such assets, the gate reads: no mapped upstream partition has a blocking check that has not passed.
_BLOCKING_CHECKS_PASSED = dg.AutomationCondition.all_checks_match(
    dg.AutomationCondition.check_passed() | dg.AutomationCondition.will_be_requested(), blocking_only=True
)
PIPELINE_PARTIAL_DEPS = PIPELINE.replace(
    "all_deps_blocking_checks_passed",
    (~dg.AutomationCondition.any_deps_match(~_BLOCKING_CHECKS_PASSED)).with_label(
        "no upstream blocking check unpassed"
    ),
)
