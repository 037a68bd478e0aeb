"""The artifact contract: graph names (graph_contract), manifest.json (manifest), PEFT adapter
files and the stacked banks built from them (adapter_files, lora_bank), the supported model
families; and its runtime half: the KV caches and the step drivers that both verification
(before an artifact is published) and the inference service use to run a compiled graph
(step_driver.FusedStepDriver for the fused graph, traced_step_driver.TracedStepDriver for the traced
one), the scheduler and the AI 100 stepper."""
