"""The test suite (a regular package: a dependency of the launch extra, smdebug_rulesconfig,
installs a top-level ``tests`` package that would otherwise shadow this one in spawned processes)."""
