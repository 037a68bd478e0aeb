"""Options: the LORAFLOW_* settings registry (settings) and process config (config), the strict
config.json reader (hf_config), user-chosen names, the sampling fields and the memory budget."""
