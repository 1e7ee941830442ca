"""Hypothesis proofs over the step-able job core: monotonic progress, clean cancel, hook order."""

from hypothesis import settings

from sdjobs.testing import JobRules

# Enough examples that every cancel mode meets every state of a stage on each run (see docs/machine.md).
JobRules.TestCase.settings = settings(JobRules.TestCase.settings, stateful_step_count=40, max_examples=500)
TestJobRules = JobRules.TestCase
