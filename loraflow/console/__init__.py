"""The terminal side of the user-facing layer: `loraflow up` (up) and what the CLI prints
(formatting). The CLI itself is loraflow/cli.py and the client loraflow/client.py."""
