"""Shipped data of the output moderator (lexicons, policy); a package so wheels include it."""
