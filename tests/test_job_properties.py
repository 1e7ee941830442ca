"""Hypothesis proofs over the step-able job core: monotonic progress, clean cancel, hook order."""

from hypothesis import settings

from sdjobs.testing import JobRules

JobRules.TestCase.settings = settings(JobRules.TestCase.settings, stateful_step_count=40)
TestJobRules = JobRules.TestCase
