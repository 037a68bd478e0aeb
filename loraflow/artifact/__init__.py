"""The artifact contract's runtime half: the KV cache and the step driver that both verification
(before an artifact is published) and the inference service use to run a compiled graph."""
