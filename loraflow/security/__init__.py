"""What makes a loraflow service safe to put on a network: identity, transport, confined inputs."""
