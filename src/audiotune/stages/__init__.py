"""One recipe per stage: read inputs, build, run, publish."""
