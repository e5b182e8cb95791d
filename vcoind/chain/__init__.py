"""The EVM chain: compiled contracts, deployment, and the node's chain client."""
