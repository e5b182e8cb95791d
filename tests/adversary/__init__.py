"""The red-team suite: a hostile node built from the project's own parts attacks real daemons."""
