"""The one-row endpoint every variant of the peer benchmark serves."""
