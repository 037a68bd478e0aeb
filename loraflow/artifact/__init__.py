"""The artifact contract's runtime half: the KV caches and the step drivers that both verification
(before an artifact is published) and the inference service use to run a compiled graph
(step_driver.FusedStepDriver for the fused graph, traced_step_driver.TracedStepDriver for the traced one)."""
