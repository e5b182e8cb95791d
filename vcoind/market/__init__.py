"""Task market: announce, bids, selection, assignment (origin); bids, execution (worker)."""
