"""Shipped data of the input guard (lexicons, patterns, policy); a package so wheels include it."""
