"""Before anything heavy: compose every member and chain link, validate it, refuse bad input with exit 2."""
