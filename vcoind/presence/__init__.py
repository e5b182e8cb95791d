"""Presence: heartbeats, the peer table and the NetworkView built on them."""
