"""Operations: risk alerts (and, next, SLAs and the dashboard)."""
