"""Compiler passes: each module is one pure function from one IR level to the next."""
