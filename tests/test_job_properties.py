"""Hypothesis proofs over the step-able job core: monotonic progress, clean cancel, hook order."""

import os

from hypothesis import settings

from sdjobs.testing import JobRules

# Enough examples that every cancel mode meets every state of a stage on each run (see docs/machine.md);
# under `./dev mutate`, which runs it once per mutant of the job core, the mutate profile's number.
EXAMPLES = settings.default.max_examples if os.environ.get("SDJOBS_HYPOTHESIS_PROFILE") == "mutate" else 500
JobRules.TestCase.settings = settings(JobRules.TestCase.settings, stateful_step_count=40, max_examples=EXAMPLES)
TestJobRules = JobRules.TestCase
