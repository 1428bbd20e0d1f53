"""Single-process tests of megatron_glm.parallel (multi-process ones: tests/distributed/)."""
