"""Backends: each executes a described ``Problem`` on one kind of device."""
