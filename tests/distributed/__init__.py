"""Multi-process tests (gloo ranks spawned by `tests.distributed.harness.run_distributed`)."""
